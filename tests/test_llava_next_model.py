"""LLaVA-NeXT VisionZip end to end: features against an independent reference (an eager copy of the tower, the
per-crop loop of ALGORITHMS.md §1.2 and the layout loop of §1.5), generation against stock LLaVA-NeXT's language
model fed the reduced features by hand, batches mixing grids against each prompt alone, loading, refusals and
remote code."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from llava_next_published import published_stock_checkpoint
from llava_token_reduction import (
    LlavaNextVisionZipConfig,
    LlavaNextVisionZipForConditionalGeneration,
    LlavaVisionZipForConditionalGeneration,
)
from llava_token_reduction.modeling.family_llava_next import image_layouts
from llava_token_reduction.tiny_next import build_next_processor, llava_next_config_kwargs
from visionzip_reference import eager_tower_outputs, reference_layout, reference_projection, reference_visionzip


DOMINANT, CONTEXTUAL = 10, 4
# (height, width) at the tiny 56-px crop: 2x2, 1x3, 1x2 grids.
SIZES = [(120, 120), (30, 200), (56, 100)]
NEW_TOKENS = 4


def make_images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


@pytest.fixture(scope="module")
def processor():
    return build_next_processor()


@pytest.fixture(scope="module")
def model(processor, spread_vision_weights):
    torch.manual_seed(0)
    config = LlavaNextVisionZipConfig(**llava_next_config_kwargs(tokenizer=processor.tokenizer),
                                      dominant_tokens=DOMINANT, contextual_tokens=CONTEXTUAL)
    model = LlavaNextVisionZipForConditionalGeneration(config)
    spread_vision_weights(model.model.vision_tower, seed=1)
    model.generation_config.suppress_tokens = [config.image_token_id]
    return model.eval()


@pytest.fixture(scope="module")
def stock(model, processor):
    """Stock LLaVA-NeXT holding the same weights (its language model is the reference)."""
    stock = LlavaNextForConditionalGeneration(
        LlavaNextConfig(**llava_next_config_kwargs(tokenizer=processor.tokenizer))).eval()
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    stock.generation_config.suppress_tokens = [model.config.image_token_id]
    return stock


def _features(model, inputs):
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])


# Features against the independent reference -----------------------------------------------------------------


@pytest.mark.parametrize("budget", [(10, 4), (3, 1), (20, 0), (1, 6)], ids=lambda b: f"{b[0]}+{b[1]}")
def test_features_match_the_reference(model, processor, budget):
    model.config.dominant_tokens, model.config.contextual_tokens = budget
    try:
        inputs = processor(images=make_images(seed=5), text=["<image>"] * 3, return_tensors="pt", padding=True)
        features = _features(model, inputs)
    finally:
        model.config.dominant_tokens, model.config.contextual_tokens = DOMINANT, CONTEXTUAL
    layouts = image_layouts(inputs["image_sizes"], model.config)
    assert [layout.grid for layout in layouts] == [(2, 2), (1, 3), (1, 2)]
    crops = torch.cat([p[:layout.crops] for p, layout in zip(inputs["pixel_values"], layouts)])
    tower, outputs = eager_tower_outputs(model, crops)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    dominant, contextual = budget
    crop = 0
    for layout, actual in zip(layouts, features.pooler_output):
        reduced, kept = [], []
        for _ in range(layout.crops):
            tokens, margin = reference_visionzip(tower, outputs, crop, -2, dominant, contextual)
            # Scores and similarities agree to ~1e-7 between implementations; a margin 100x larger rules out ties.
            assert margin > 1e-5, f"test data too close to a tie (margin {margin}); change the seed"
            reduced.append(tokens)
            # Which patches the reference kept: the rows of the layer output equal to its dominant tokens.
            x = outputs.hidden_states[-2][crop]
            kept.append([int((x[1:] - row).abs().sum(-1).argmin()) for row in tokens[1:dominant]])
            crop += 1
        projected = reference_projection(model, torch.stack(reduced))  # [crops, k, text_hidden]
        rows = [f"{c}:{t}" for c in range(layout.crops) for t in range(dominant + contextual)]
        order = reference_layout([rows[c * (dominant + contextual):(c + 1) * (dominant + contextual)]
                                  for c in range(layout.crops)], kept, layout.grid, side)
        flat = projected.reshape(-1, projected.shape[-1])
        expected = torch.stack([flat[rows.index(name)] for name in order])
        assert actual.shape == (layout.crops * (dominant + contextual), model.config.text_config.hidden_size)
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-5)
    assert crop == features.last_hidden_state.shape[0] == sum(layout.crops for layout in layouts)


def test_budget_that_does_not_fit_raises_before_the_tower(model, processor):
    """A 1x3 image of a thin strip has only the base crop's 48 placeholders (+ few rows) for 4 crops."""
    inputs = processor(images=make_images([(56, 100), (4, 168)]), text=["<image>"] * 2, return_tensors="pt",
                       padding=True)
    layouts = image_layouts(inputs["image_sizes"], model.config)
    calls = []
    handle = model.model.vision_tower.register_forward_pre_hook(lambda *a: calls.append(1))
    model.config.dominant_tokens = 14
    try:
        with pytest.raises(ValueError, match=rf"image 1 \(4x168 px, grid 1x3, 4 crops\) has {layouts[1].placeholders} "
                                             rf"image tokens.*largest per-crop budget that fits this image is "
                                             rf"{layouts[1].placeholders // 4}"):
            _features(model, inputs)
        with pytest.raises(ValueError, match="image 1"):
            model.generate(**inputs, max_new_tokens=1)
    finally:
        model.config.dominant_tokens = DOMINANT
        handle.remove()
    assert not calls


def test_image_sizes_are_required(model, processor):
    inputs = processor(images=make_images()[:1], text=["<image>"], return_tensors="pt")
    with pytest.raises(ValueError, match="image_sizes"):
        model.model.get_image_features(pixel_values=inputs["pixel_values"])


# Generation ---------------------------------------------------------------------------------------------------

PROMPTS = ["USER: <image>\nWhat? ASSISTANT:", "USER: <image><image>\nAnd these two? ASSISTANT:"]


def _stock_on_reduced_prompt(stock, model, processor, prompt, images, **generate_kwargs):
    """Stock LLaVA-NeXT's language model on the prompt with exactly the reduced count per image, the reduced
    features placed there by hand (`mm_encoder_outputs`)."""
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    features = list(_features(model, inputs).pooler_output)
    image = model.config.image_token_id
    ids = inputs["input_ids"][0].tolist()
    compact, i, f = [], 0, 0
    while i < len(ids):
        if ids[i] == image:
            count = image_layouts(inputs["image_sizes"][f:f + 1], model.config)[0].placeholders
            compact += [image] * len(features[f])
            i, f = i + count, f + 1
        else:
            compact.append(ids[i])
            i += 1
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    with torch.no_grad():
        out = stock.generate(input_ids=torch.tensor([compact]),
                             attention_mask=torch.ones(1, len(compact), dtype=torch.long),
                             mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)},
                             max_new_tokens=NEW_TOKENS, do_sample=False, **generate_kwargs)
    return out[0, len(compact):]


def test_batch_mixing_grids_equals_each_prompt_alone_and_stock(model, stock, processor):
    images = make_images(seed=2)
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    length = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :length], inputs["input_ids"])  # the prompt as given
    groups = [images[:1], images[1:]]
    for row, (prompt, row_images) in enumerate(zip(PROMPTS, groups)):
        alone = processor(images=row_images, text=[prompt], return_tensors="pt")
        with torch.no_grad():
            single = model.generate(**alone, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(single[0, alone["input_ids"].shape[1]:], out[row, length:]), row
        reference = _stock_on_reduced_prompt(stock, model, processor, prompt, row_images)
        assert torch.equal(reference, out[row, length:]), row


def test_generate_options(model, processor):
    from transformers import TextIteratorStreamer
    inputs = processor(images=make_images(seed=3), text=PROMPTS, return_tensors="pt", padding=True)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        static = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
        beams = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=2)
        torch.manual_seed(7)
        sampled = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=5)
        torch.manual_seed(7)
        sampled_again = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=5)
    assert torch.equal(static, greedy)
    assert beams.shape[0] == 2 and torch.equal(beams[:, :length], inputs["input_ids"])
    assert torch.equal(sampled, sampled_again) and torch.equal(sampled[:, :length], inputs["input_ids"])
    one = processor(images=make_images(seed=3)[:1], text=PROMPTS[:1], return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    with torch.no_grad():
        out = model.generate(**one, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
    assert "".join(streamer) == processor.tokenizer.decode(out[0, one["input_ids"].shape[1]:])


def test_forward_with_labels_equals_stock_on_the_reduced_prompt(model, stock, processor):
    images = make_images(seed=4)[:1]
    inputs = processor(images=images, text=PROMPTS[:1], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        features = list(_features(model, inputs).pooler_output)
    image = model.config.image_token_id
    ids = inputs["input_ids"][0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[(ids == image).nonzero()[len(features[0]):, 0]] = False
    compact = ids[keep][None]
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    with torch.no_grad():
        expected = stock(input_ids=compact, labels=compact,
                         mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features)})
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)


def test_multi_turn_continuation_sends_only_the_new_image(model, processor):
    first_images, new_image = make_images(seed=6)[:1], make_images(seed=6)[2:]
    first = processor(images=first_images, text=["USER: <image>\nWhat? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**first, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    second = processor(images=new_image, text=[" USER: <image>\nAnd this? ASSISTANT:"], return_tensors="pt")
    ids = torch.cat([out.sequences, second["input_ids"][:, 1:]], dim=1)  # the history, then the new turn (no BOS)
    mask = torch.ones_like(ids)
    # From scratch, both images, given as one [crops, C, H, W] tensor per image (their crop counts differ).
    both = [first["pixel_values"][0], second["pixel_values"][0]]
    sizes = torch.cat([first["image_sizes"], second["image_sizes"]])
    with torch.no_grad():
        scratch = model.generate(input_ids=ids, attention_mask=mask, pixel_values=both, image_sizes=sizes,
                                 max_new_tokens=NEW_TOKENS, do_sample=False)
        continued = model.generate(input_ids=ids, attention_mask=mask, pixel_values=second["pixel_values"],
                                   image_sizes=second["image_sizes"], cache=out.cache, max_new_tokens=NEW_TOKENS,
                                   do_sample=False)
    assert torch.equal(continued, scratch)


# Loading, refusals, remote code ------------------------------------------------------------------------------


def test_stock_checkpoint_loads_cleanly_with_the_budget_given_at_load_time(model, processor, tmp_path):
    directory = published_stock_checkpoint(model, processor, tmp_path)
    assert json.loads((directory / "config.json").read_text())["model_type"] == "llava_next"
    loaded, info = LlavaNextVisionZipForConditionalGeneration.from_pretrained(
        directory, dominant_tokens=6, contextual_tokens=2, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert (loaded.config.dominant_tokens, loaded.config.contextual_tokens) == (6, 2)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert type(AutoProcessor.from_pretrained(directory)).__name__ == "LlavaNextProcessor"
    inputs = processor(images=make_images()[:1], text=["<image>"], return_tensors="pt")
    assert _features(loaded.eval(), inputs).pooler_output[0].shape[0] == 5 * 8


def test_checkpoints_of_the_other_family_are_refused(model, processor, stock_llava_dir, tmp_path):
    directory = published_stock_checkpoint(model, processor, tmp_path)
    with pytest.raises(ValueError, match="LLaVA-NeXT checkpoint"):
        LlavaVisionZipForConditionalGeneration.from_pretrained(directory)
    with pytest.raises(ValueError, match="LLaVA-1.5 checkpoint"):
        LlavaNextVisionZipForConditionalGeneration.from_pretrained(stock_llava_dir)


def test_remote_code_round_trip_without_the_package(model, processor, run_isolated_python, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["model_type"] == "llava_next_visionzip"
    assert set(saved["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    inputs = processor(images=make_images(seed=8), text=PROMPTS, return_tensors="pt", padding=True)
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    run_isolated_python(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model, info = AutoModelForImageTextToText.from_pretrained(
            {os.fspath(checkpoint)!r}, trust_remote_code=True, output_loading_info=True)
        assert not {{k: v for k, v in info.items() if k != "error_msgs" and v}}, info
        assert type(model).__name__ == "LlavaNextVisionZipForConditionalGeneration"
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert type(AutoProcessor.from_pretrained({os.fspath(checkpoint)!r})).__name__ == "LlavaNextProcessor"
        inputs = torch.load("inputs.pt")
        with torch.no_grad():
            out = model.eval().generate(**inputs, max_new_tokens={NEW_TOKENS}, do_sample=False)
        torch.save(out, "out.pt")
        """,
        tmp_path,
    )
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_inner_model_accepts_stock_prompts_and_forward_passes_image_sizes_on(model, processor):
    """`AutoModel` (the inner model) compacts stock-processor prompts too; `image_sizes` given by name reaches the
    reduction in both `forward`s (a named parameter must not swallow the family's per-image input)."""
    inputs = processor(images=make_images(seed=9), text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        inner = model.model(**inputs)
        outer = model(**inputs, output_hidden_states=True)
    torch.testing.assert_close(inner.last_hidden_state, outer.hidden_states[-1], atol=1e-6, rtol=1e-6)
    assert inner.last_hidden_state.shape[1] < inputs["input_ids"].shape[1]
    without_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="image_sizes"):
        model(**without_sizes)


def test_positional_forward_binds_as_stock_llava_next(model, processor):
    """Stock LLaVA-NeXT's `forward(input_ids, pixel_values, image_sizes, attention_mask, ...)` order."""
    inputs = processor(images=make_images(seed=10), text=PROMPTS, return_tensors="pt", padding=True)
    args = (inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"], inputs["attention_mask"])
    with torch.no_grad():
        by_name = model(**inputs)
        by_position = model(*args)
        inner_by_name = model.model(**inputs)
        inner_by_position = model.model(*args)
    torch.testing.assert_close(by_position.logits, by_name.logits, atol=0, rtol=0)
    torch.testing.assert_close(inner_by_position.last_hidden_state, inner_by_name.last_hidden_state, atol=0, rtol=0)


def test_visionzip_layer_outputs_cover_every_crop(model, processor):
    """The method's picture/measurement entry (`get_visionzip_layer_outputs`) runs on the NeXT family's crops."""
    inputs = processor(images=make_images(seed=11), text=["<image>"] * 3, return_tensors="pt", padding=True)
    crops = sum(layout.crops for layout in image_layouts(inputs["image_sizes"], model.config))
    with torch.no_grad():
        features, cls_attention, mean_keys = model.model.get_visionzip_layer_outputs(
            inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2 + 1
    assert features.shape[:2] == cls_attention.shape == (crops, tokens) and mean_keys.shape[:2] == (crops, tokens)
