"""The vision tower runs only as deep as the method reads (issue 16): layer -2 skips the last layer, and every
output is bit for bit the full-depth run's.

The reference runs the whole tower through its own forward (every layer, as stock LLaVA and the released code do)
and hands the states the method declares to its reduction and the projector; results are compared with
`torch.equal`. Which layers ran is counted with forward hooks on the test's own model.
"""

import pytest
import torch
from PIL import Image

from llava_token_reduction.modeling.family_llava import project_per_image
from llava_token_reduction.modeling.vision_inputs import vision_tower_pieces
from llava_token_reduction.tiny import TEST_SHAPE, build_method_model, build_method_processor


LAYERS = TEST_SHAPE.vision_layers  # 3


def _model_and_inputs(method, dtype=torch.float32, images=2, **fields):
    processor = build_method_processor(method)
    budget = {"dominant_tokens": 8, "contextual_tokens": 4} if method == "visionzip" else {}
    model = build_method_model(method, processor=processor, seed=0, **budget, **fields).to(dtype)
    generator = torch.Generator().manual_seed(3)
    pictures = [Image.fromarray((torch.rand(40, 50, 3, generator=generator) * 255).byte().numpy())
                for _ in range(images)]
    prompt = "USER: " + "<image>\n" * images + "what is in the picture ASSISTANT:"
    inputs = processor(images=pictures, text=[prompt], return_tensors="pt")
    side = {key: inputs[key] for key in model.model.image_side_input_names}
    return model, inputs["pixel_values"].to(dtype), side


def _full_depth_reference(model, pixels, side):
    """The old way: the whole tower through its own forward, then the method's reduction and the projector."""
    inner = model.model
    full = inner.vision_tower(pixels, output_hidden_states=True, return_dict=True)
    assert len(full.hidden_states) == LAYERS + 1
    states = [full.hidden_states[index] for index in inner.vision_states_needed()]
    reduction = inner.reduce_crops(states, torch.arange(pixels.shape[0]), side)
    return reduction, project_per_image(inner.multi_modal_projector, reduction.tokens)


def _layers_run(model):
    """Per call: how many times each encoder layer ran (hooks on the test's own model; remove with .remove())."""
    counts = [0] * LAYERS
    handles = [layer.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, layer in enumerate(model.model.vision_tower.encoder.layers)]
    return counts, handles


# (method, config field, value, layers the tower must run)
CASES = [
    ("visionzip", "visionzip_layer", -2, 2),  # the default: the last layer is dead work
    ("visionzip", "visionzip_layer", 0, 1),
    ("visionzip", "visionzip_layer", 1, 2),
    ("visionzip", "visionzip_layer", -1, 3),  # the last layer: nothing to cut
    ("trim", "vision_feature_layer", -2, 2),  # the default
    ("trim", "vision_feature_layer", 1, 1),
    ("trim", "vision_feature_layer", 0, 1),  # hidden state 0 is recorded as layer 0's input: one layer runs
    ("trim", "vision_feature_layer", -1, 3),  # the last layer: nothing to cut
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method,field,value,depth", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_features_are_bit_identical_to_the_full_depth_run(method, field, value, depth, dtype):
    model, pixels, side = _model_and_inputs(method, dtype, **{field: value})
    counts, handles = _layers_run(model)
    try:
        with torch.no_grad():
            got = model.model.get_image_features(pixel_values=pixels, **side)
    finally:
        for handle in handles:
            handle.remove()
    assert counts == [1] * depth + [0] * (LAYERS - depth), counts
    with torch.no_grad():
        reduction, expected = _full_depth_reference(model, pixels, side)
    assert len(got.pooler_output) == len(expected) == 2
    for mine, theirs in zip(got.pooler_output, expected):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    assert torch.equal(got.last_hidden_state, reduction.last_hidden_state)
    for name, value in reduction.extras.items():  # TRIM's kept indices and scores
        mine = getattr(got, name)
        if isinstance(value, list):
            assert all(torch.equal(a, b) for a, b in zip(mine, value))
        else:
            assert torch.equal(mine, value)
    assert got.hidden_states is None and got.attentions is None


@pytest.mark.parametrize("method", ["visionzip", "trim"])
def test_asked_hidden_states_deepen_the_run_and_equal_the_towers(method):
    model, pixels, side = _model_and_inputs(method)
    with torch.no_grad():
        plain = model.model.get_image_features(pixel_values=pixels, **side)
        stock = model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        for asked, depth in (([-1], 3), ([0], 2), (True, 3)):
            counts, handles = _layers_run(model)
            try:
                got = model.model.get_image_features(pixel_values=pixels, output_hidden_states=asked, **side)
            finally:
                for handle in handles:
                    handle.remove()
            assert counts == [1] * depth + [0] * (LAYERS - depth), (asked, counts)
            assert len(got.hidden_states) == LAYERS + 1
            selected = range(LAYERS + 1) if asked is True else [i % (LAYERS + 1) for i in asked]
            for index, state in enumerate(got.hidden_states):
                if index in selected:
                    assert torch.equal(state, stock.hidden_states[index]), (asked, index)
                else:
                    assert state is None, (asked, index)
            for a, b in zip(got.pooler_output, plain.pooler_output):  # asking for more changes nothing else
                assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["visionzip", "trim"])
def test_projector_gradients_equal_the_full_depth_run(method):
    """Projector tuning: the cut changes no gradient (the last layer never fed the loss)."""
    model, pixels, side = _model_and_inputs(method)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    projector = model.model.multi_modal_projector

    def gradients(run):
        projector.zero_grad(set_to_none=True)
        loss = sum((features.float() ** 2).sum() for features in run())
        loss.backward()
        return [parameter.grad.clone() for parameter in projector.parameters()]

    got = gradients(lambda: model.model.get_image_features(pixel_values=pixels, **side).pooler_output)
    expected = gradients(lambda: _full_depth_reference(model, pixels, side)[1])
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(bool(g.abs().sum() > 0) for g in got)


def test_the_tower_module_is_left_as_it_was(make_visionzip_model, make_pixel_values):
    """No attribute, hook or layer list of the user's tower changes, also across calls."""
    model = make_visionzip_model()
    tower = model.model.vision_tower
    model.model.get_image_features(pixel_values=make_pixel_values())  # transformers installs its own hooks once
    layers = list(tower.encoder.layers)
    before = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), dict(m.__dict__.get("_modules", {})))
              for name, m in tower.named_modules()}
    with torch.no_grad():
        model.model.get_image_features(pixel_values=make_pixel_values(batch=2))
    after = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), dict(m.__dict__.get("_modules", {})))
             for name, m in tower.named_modules()}
    assert after == before and list(tower.encoder.layers) == layers
    assert "forward" not in tower.__dict__ and "forward" not in tower.encoder.__dict__


def test_pieces_are_what_a_run_calls(make_visionzip_model, make_pixel_values):
    """`vision_tower_pieces` (what `bench` times) covers every module a cut run calls, in order."""
    model = make_visionzip_model()
    tower = model.model.vision_tower
    called = []
    handles = [piece.register_forward_pre_hook(lambda module, _args: called.append(module))
               for piece in vision_tower_pieces(tower)]
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=make_pixel_values())
    finally:
        for handle in handles:
            handle.remove()
    assert called == [tower.embeddings, tower.pre_layrnorm, *tower.encoder.layers[:-1]]
