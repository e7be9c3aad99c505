"""What every reduction method does the same way, run over `methods_under_test.METHOD_NAMES` (a method added to the
registry joins by one line there): features equal the method's independent reference, a batch equals each image and
each prompt alone, generate equals stock LLaVA on the reduced prompt, multi-turn with the cache, half precision,
device_map with disk offload, and the remote-code round trip in a clean process without the package (one process for
all methods). The pipeline and the generate options are in tests/test_pipeline.py and
tests/test_generate_options_all_methods.py; what only one method does stays in that method's own modules."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava_token_reduction.methods import METHODS
from llava_token_reduction.modeling.reduced_generation import PLAN_ATTRIBUTE
from methods_under_test import METHOD_FIELDS, METHOD_NAMES, METHOD_REFERENCES, image_features


NEW_TOKENS = 5
# Questions of different lengths (TRIM scores patches against the question of the turn that brings the image).
PROMPTS = [
    "USER: <image>\nwhat color is the car? ASSISTANT:",
    "USER: <image>\nhow many dogs are sitting on the grass near the red house? ASSISTANT:",
    "USER: <image>\nCompare this<image>\nwith that one. ASSISTANT:",
]


def picture(seed, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def prompt_images(index):
    return [picture(10 * index + i, (60 + 3 * i, 57)) for i in range(PROMPTS[index].count("<image>"))]


def side_inputs(name, inputs, rows=slice(None)):
    return {key: inputs[key][rows] for key in METHODS[name].side_inputs}


def reference_continuation(setup, prompt, images, **generate_kwargs):
    """Stock LLaVA on `prompt` with exactly k_i placeholders per image, the reduced features placed there."""
    inputs = setup.processor(images=images, text=[prompt], return_tensors="pt")
    features = image_features(setup.model, inputs, setup.name)
    pieces = prompt.split("<image>")
    text = pieces[0] + "".join("<image>" * len(f) + piece for f, piece in zip(features, pieces[1:]))
    ids = setup.processor.tokenizer(text, return_tensors="pt").input_ids
    out = setup.stock.generate(input_ids=ids, mm_encoder_outputs={"image": BaseModelOutputWithPooling(
        pooler_output=features)}, max_new_tokens=NEW_TOKENS, do_sample=False, **generate_kwargs)
    return out[0, ids.shape[1]:].tolist()


# Features -----------------------------------------------------------------------------------------------------


def test_the_method_list_covers_the_registry():
    assert set(METHOD_NAMES) == set(METHODS) == set(METHOD_REFERENCES)


def _batch_inputs(setup):
    images = [picture(seed) for seed in (1, 2, 3)]
    return setup.processor(images=images, text=PROMPTS[:2] + ["USER: <image>\nis it raining? ASSISTANT:"],
                           padding=True, return_tensors="pt")


def test_features_equal_the_methods_reference(method_setup):
    inputs = _batch_inputs(method_setup)
    mine = image_features(method_setup.model, inputs, method_setup.name)
    expected = METHOD_REFERENCES[method_setup.name](method_setup.model, inputs)
    assert len(mine) == len(expected) == 3
    for image, (ours, theirs) in enumerate(zip(mine, expected)):
        assert ours.shape == theirs.shape, image
        assert 0 < len(ours) < method_setup.model.config.image_seq_length  # the tiny test budget reduces
        # The projector amplifies the ~1e-6 sdpa-vs-eager rounding of the tower: 1e-5 of the output scale.
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(ours, theirs, atol=1e-5 * scale, rtol=1e-5, msg=f"image {image}")


def test_a_batch_of_images_equals_each_image_alone(method_setup):
    name, model = method_setup.name, method_setup.model
    inputs = _batch_inputs(method_setup)
    with torch.no_grad():
        batch = model.model.get_image_features(pixel_values=inputs["pixel_values"], **side_inputs(name, inputs))
        for image in range(3):
            rows = slice(image, image + 1)
            alone = model.model.get_image_features(pixel_values=inputs["pixel_values"][rows],
                                                   **side_inputs(name, inputs, rows))
            if getattr(batch, "kept_indices", None) is not None:
                assert torch.equal(alone.kept_indices[0], batch.kept_indices[image])
            # sdpa picks other kernels for another batch size: ~1e-7 of the output scale after the projector.
            scale = max(1.0, batch.pooler_output[image].abs().max().item())
            torch.testing.assert_close(alone.pooler_output[0], batch.pooler_output[image], rtol=1e-5,
                                       atol=1e-6 * scale)


# Generation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_generate_equals_stock_llava_on_the_reduced_prompt(method_setup, index):
    images = prompt_images(index)
    inputs = method_setup.processor(images=images, text=[PROMPTS[index]], return_tensors="pt")
    out = method_setup.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"])  # the prompt as given, then the new tokens
    assert out[0, prompt_length:].tolist() == reference_continuation(method_setup, PROMPTS[index], images)


def test_a_padded_batch_of_prompts_equals_each_prompt_alone(method_setup):
    groups = [prompt_images(index) for index in range(len(PROMPTS))]
    inputs = method_setup.processor(images=[image for group in groups for image in group], text=PROMPTS,
                                    return_tensors="pt", padding=True)
    out = method_setup.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    for row, (prompt, group) in enumerate(zip(PROMPTS, groups)):
        alone = method_setup.processor(images=group, text=[prompt], return_tensors="pt")
        expected = method_setup.model.generate(**alone, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out[row, inputs["input_ids"].shape[1]:].tolist() == expected[0, alone["input_ids"].shape[1]:].tolist()
        assert expected[0, alone["input_ids"].shape[1]:].tolist() == reference_continuation(method_setup, prompt, group)


def test_multi_turn_with_the_cache_reduces_only_the_new_image_and_equals_from_scratch(method_setup):
    model, processor = method_setup.model, method_setup.processor
    first_turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the car?"}]}]
    prompt = processor.apply_chat_template(first_turn, add_generation_prompt=True)
    inputs = processor(images=[picture(7)], text=[prompt], return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    # The contract's history: the previous output unchanged, then the new turn (here with a new image).
    new_turn = processor(images=[picture(8)], text=[" USER: <image>\nand how many dogs are there? ASSISTANT:"],
                         return_tensors="pt", add_special_tokens=False)
    history = torch.cat([first.sequences, new_turn["input_ids"]], dim=1)
    names = ("pixel_values",) + METHODS[method_setup.name].side_inputs
    all_images = {key: torch.cat([inputs[key], new_turn[key]]) for key in names}
    calls = []
    handle = model.model.vision_tower.embeddings.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        continued = model.generate(input_ids=history, **all_images, cache=first.cache, max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
    finally:
        handle.remove()
    assert calls == [1], "the cached image must not be reduced again"
    plan = getattr(first.cache, PLAN_ATTRIBUTE)
    assert len(plan.kept_tokens[0]) == 2
    # From scratch, each image with its own turn's inputs (TRIM: the question of its own turn).
    scratch = model.generate(input_ids=history, **all_images, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert continued[0, history.shape[1]:].tolist() == scratch[0, history.shape[1]:].tolist()
    first_count = len(image_features(model, inputs, method_setup.name)[0])
    assert plan.kept_tokens[0][0] == first_count, "the first image keeps the count chosen in its own turn"


# Loading: half precision, device_map -------------------------------------------------------------------------


def _loaded_features(model, inputs, name):
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype),
                                                   **side_inputs(name, inputs)).pooler_output)


def test_a_bfloat16_load_reduces_and_generates(method_setup):
    name, processor = method_setup.name, method_setup.processor
    model = AutoModelForImageTextToText.from_pretrained(method_setup.directory, dtype=torch.bfloat16).eval()
    assert model.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    inputs = processor(images=prompt_images(2), text=[PROMPTS[2]], return_tensors="pt")
    features = _loaded_features(model, inputs, name)
    assert len(features) == 2
    for each in features:
        assert each.dtype == torch.bfloat16 and torch.isfinite(each).all()
        assert 0 < len(each) < model.config.image_seq_length
    out = model.generate(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()}, max_new_tokens=2,
                         do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"]) and out.shape[1] > 0


def test_device_map_with_disk_offload_gives_the_same_features_and_tokens(method_setup, tmp_path):
    name, processor = method_setup.name, method_setup.processor
    plain = AutoModelForImageTextToText.from_pretrained(method_setup.directory).eval()
    offloaded = AutoModelForImageTextToText.from_pretrained(
        method_setup.directory, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload"
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values()), offloaded.hf_device_map
    inputs = processor(images=prompt_images(2), text=[PROMPTS[2]], return_tensors="pt")
    for ours, theirs in zip(_loaded_features(offloaded, inputs, name), _loaded_features(plain, inputs, name),
                            strict=True):
        assert ours.device.type != "meta" and ours.abs().sum() > 0  # not the zeros of meta-weight arithmetic
        torch.testing.assert_close(ours.cpu(), theirs, atol=1e-6, rtol=0)
    expected = plain.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(offloaded.generate(**inputs, max_new_tokens=3, do_sample=False).cpu(), expected)


# Remote code ----------------------------------------------------------------------------------------------------


def test_every_checkpoint_loads_as_remote_code_in_one_clean_process(saved_methods, run_isolated_python, tmp_path):
    """One child process without the package loads each method's checkpoint through `AutoProcessor`,
    `AutoConfig`, `AutoModel` and `AutoModelForImageTextToText` with `trust_remote_code=True`, saves it again and
    reloads it; processor outputs, features, logits and generated tokens are exactly those of the package's classes
    loading the same checkpoint in the parent."""
    picture(5).save(tmp_path / "image.png")
    prompt = PROMPTS[0]
    expected = {}
    for name, setup in saved_methods.items():
        # The package's classes on the same files (an in-memory model may differ from a loaded one by float
        # rounding: other memory layouts pick other kernels).
        local = AutoModelForImageTextToText.from_pretrained(setup.directory).eval()
        assert type(local) is METHODS[name].generation_class
        inputs = setup.processor(images=Image.open(tmp_path / "image.png"), text=prompt, return_tensors="pt")
        with torch.no_grad():
            expected[name] = {
                "inputs": dict(inputs), "features": image_features(local, inputs, name),
                "logits": local(**inputs).logits,
                "tokens": local.generate(**inputs, max_new_tokens=3, do_sample=False),
                "fields": {key: getattr(local.config, key) for key in METHOD_FIELDS[name]},
            }
        torch.testing.assert_close(expected[name]["logits"], setup.model(**inputs).logits, rtol=1e-5, atol=1e-5)
    torch.save(expected, tmp_path / "expected.pt")
    checkpoints = {name: os.fspath(setup.directory) for name, setup in saved_methods.items()}
    classes = {name: (method.config_class.__name__, method.model_class.__name__, method.generation_class.__name__,
                      method.processor_class.__name__) for name, method in METHODS.items()}
    result = run_isolated_python(
        f"""
        import sys
        import torch
        from PIL import Image
        from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

        expected = torch.load("expected.pt")
        classes = {classes!r}

        def clean(info):
            return {{k: v for k, v in info.items() if k != "error_msgs" and v}}

        def remote(thing):
            assert type(thing).__module__.startswith("transformers_modules."), type(thing).__module__

        for name, path in {checkpoints!r}.items():
            want = expected[name]
            config_name, inner_name, outer_name, processor_name = classes[name]
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
            assert type(processor).__name__ == processor_name, type(processor)
            inputs = processor(images=Image.open("image.png"), text={prompt!r}, return_tensors="pt")
            assert inputs.keys() == want["inputs"].keys(), (name, inputs.keys())
            for key, value in want["inputs"].items():
                assert torch.equal(inputs[key], value), (name, key)

            config = AutoConfig.from_pretrained(path, trust_remote_code=True)
            assert type(config).__name__ == config_name, type(config)
            remote(config)
            assert {{key: getattr(config, key) for key in want["fields"]}} == want["fields"], name

            def features(inner):
                side = {{key: inputs[key] for key in inner.image_side_input_names}}
                with torch.no_grad():
                    return list(inner.get_image_features(pixel_values=inputs["pixel_values"], **side).pooler_output)

            def check(model):
                remote(model)
                assert type(model).__name__ == outer_name, type(model)
                for got, reference in zip(features(model.model), want["features"], strict=True):
                    assert torch.equal(got, reference), name
                with torch.no_grad():
                    assert torch.equal(model(**inputs).logits, want["logits"]), name
                tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
                assert torch.equal(tokens, want["tokens"]), name

            model, info = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True,
                                                                      output_loading_info=True)
            assert not clean(info), (name, info)
            check(model.eval())

            inner, inner_info = AutoModel.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
            # The inner model has no LM head: that key alone may be left over, nothing may be missing.
            inner_info["unexpected_keys"] = {{k for k in inner_info["unexpected_keys"] if "lm_head" not in k}}
            assert not clean(inner_info), (name, inner_info)
            assert type(inner).__name__ == inner_name, type(inner)
            remote(inner)
            for got, reference in zip(features(inner.eval()), want["features"], strict=True):
                assert torch.equal(got, reference), name

            model.save_pretrained(f"resaved_{{name}}")
            again, again_info = AutoModelForImageTextToText.from_pretrained(f"resaved_{{name}}", trust_remote_code=True,
                                                                            output_loading_info=True)
            assert not clean(again_info), (name, again_info)
            check(again.eval())
            print("OK", name, [len(f) for f in want["features"]])

        leaked = [name for name, module in sys.modules.items() if name.startswith("llava_token_reduction") and module]
        assert not leaked, leaked
        """,
        tmp_path,
        timeout=300,
    )
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("OK")] == list(saved_methods)
