"""The generation mechanism: full stock-expanded prompts in, the prompt as given plus new tokens out.

The independent reference is stock `LlavaForConditionalGeneration` with the same weights, run on a prompt
with exactly `k_i` placeholders per image and the reduced features placed there.
"""

import pytest
import torch
from transformers import DynamicCache, LlavaConfig, LlavaForConditionalGeneration, TextIteratorStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from generation_support import NEW_TOKENS, PROMPTS, images, reference_new_tokens
from llava_token_reduction import LlavaVisionZipConfig, LlavaVisionZipForConditionalGeneration
from llava_token_reduction.modeling.modeling_llava_visionzip import LlavaVisionZipModel
from llava_token_reduction.modeling.reduced_generation import PLAN_ATTRIBUTE
from llava_token_reduction.tiny import build_processor, llava_config_kwargs


class VariableCountModel(LlavaVisionZipModel):
    """A test double whose images keep different numbers of tokens (like TRIM): VisionZip's output cut to
    a count that depends on the image's content."""

    def get_image_features(self, pixel_values, **kwargs):
        output = super().get_image_features(pixel_values, **kwargs)
        counts = [3 + int(abs(image.float().mean().item()) * 1e4) % 9 for image in pixel_values]
        output.pooler_output = [features[:count] for features, count in zip(output.pooler_output, counts)]
        return output


class VariableCountForConditionalGeneration(LlavaVisionZipForConditionalGeneration):
    inner_model_class = VariableCountModel


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def config_kwargs(processor):
    return llava_config_kwargs(tokenizer=processor.tokenizer)


def _build(model_class, config_kwargs, seed=0):
    torch.manual_seed(seed)
    model = model_class(LlavaVisionZipConfig(**config_kwargs, dominant_tokens=8, contextual_tokens=4)).eval()
    model.generation_config.suppress_tokens = [config_kwargs["image_token_index"]]
    return model


@pytest.fixture(scope="module", params=["visionzip", "variable"])
def model(request, config_kwargs):
    model_class = {"visionzip": LlavaVisionZipForConditionalGeneration,
                   "variable": VariableCountForConditionalGeneration}[request.param]
    return _build(model_class, config_kwargs)


@pytest.fixture(scope="module")
def reference(model, config_kwargs):
    stock = LlavaForConditionalGeneration(LlavaConfig(**config_kwargs)).eval()
    stock.load_state_dict(model.state_dict())
    stock.generation_config.suppress_tokens = [config_kwargs["image_token_index"]]
    return stock


def run(model, processor, prompts, prompt_images, **generate_kwargs):
    flat = [image for group in prompt_images for image in group]
    inputs = processor(images=flat or None, text=prompts, return_tensors="pt", padding=True)
    generate_kwargs.setdefault("max_new_tokens", NEW_TOKENS)
    return inputs, model.generate(**inputs, do_sample=False, **generate_kwargs)


@pytest.mark.parametrize("prompt_index", range(len(PROMPTS)))
def test_single_prompt_matches_stock_llava_on_reduced_prompt(model, reference, processor, prompt_index):
    prompt = PROMPTS[prompt_index]
    prompt_images = images(prompt.count("<image>"), seed=prompt_index)
    inputs, out = run(model, processor, [prompt], [prompt_images])
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    expected = reference_new_tokens(model, reference, processor, prompt, prompt_images)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == expected.tolist()


def test_batch_rows_equal_each_prompt_alone(model, processor):
    groups = [images(prompt.count("<image>"), seed=i) for i, prompt in enumerate(PROMPTS)]
    inputs, batch_out = run(model, processor, PROMPTS, groups)
    assert torch.equal(batch_out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    for row, (prompt, group) in enumerate(zip(PROMPTS, groups)):
        single_inputs, single_out = run(model, processor, [prompt], [group])
        assert (
            batch_out[row, inputs["input_ids"].shape[1]:].tolist()
            == single_out[0, single_inputs["input_ids"].shape[1]:].tolist()
        ), f"row {row} differs from the prompt run alone"


def test_variable_counts_really_vary(config_kwargs, processor):
    model = _build(VariableCountForConditionalGeneration, config_kwargs)
    pixels = processor.image_processor(images(4), return_tensors="pt").pixel_values
    counts = {len(f) for f in model.model.get_image_features(pixel_values=pixels).pooler_output}
    assert len(counts) > 1


def test_forward_logits_and_loss_on_compacted_sequence(model, reference, processor):
    prompt, prompt_images = PROMPTS[1], images(2, seed=3)
    inputs = processor(images=prompt_images, text=[prompt], return_tensors="pt")
    image_id = model.config.image_token_id
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == image_id, -100)
    output = model(**inputs, labels=labels)

    features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    pieces = prompt.split("<image>")
    text = pieces[0] + "".join("<image>" * len(f) + piece for f, piece in zip(features, pieces[1:]))
    ids = processor.tokenizer(text, return_tensors="pt").input_ids
    ref_labels = ids.masked_fill(ids == image_id, -100)
    expected = reference(
        input_ids=ids, labels=ref_labels,
        mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(features))},
    )
    assert output.logits.shape == expected.logits.shape
    torch.testing.assert_close(output.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(output.loss, expected.loss, atol=1e-6, rtol=1e-6)


def test_forward_batch_with_padding_matches_rows_alone(model, processor):
    groups = [images(1, seed=1), images(2, seed=2)]
    prompts = PROMPTS[:2]
    inputs = processor(images=[i for g in groups for i in g], text=prompts, return_tensors="pt", padding=True)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    batch = model(**inputs, labels=labels)
    for row, (prompt, group) in enumerate(zip(prompts, groups)):
        single_inputs = processor(images=group, text=[prompt], return_tensors="pt")
        single = model(**single_inputs)
        length = single.logits.shape[1]
        torch.testing.assert_close(batch.logits[row, -length:], single.logits[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(batch.loss)


def test_forward_loss_reaches_projector_gradients(config_kwargs, processor):
    model = _build(LlavaVisionZipForConditionalGeneration, config_kwargs).train()
    inputs = processor(images=images(1), text=[PROMPTS[0] + " a cat"], return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    model(**inputs, labels=labels).loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_multi_turn_with_cache_equals_from_scratch(model, processor):
    first_images, second_image = images(1, seed=5), images(1, seed=6)
    turn_one = "USER: <image>\nWhat is it? ASSISTANT:"
    inputs = processor(images=first_images, text=[turn_one], return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    cache = first.cache
    plan = getattr(cache, PLAN_ATTRIBUTE)
    assert len(plan.kept_tokens[0]) == 1

    turn_two = processor.tokenizer(" USER: <image>\nAnd this one? ASSISTANT:", add_special_tokens=False,
                                   return_tensors="pt").input_ids
    expanded = processor(images=second_image, text=["<image>"], return_tensors="pt", add_special_tokens=False)
    turn_two_ids = torch.cat([turn_two[:, :7], expanded["input_ids"], turn_two[:, 8:]], dim=1)
    history = torch.cat([first.sequences, turn_two_ids], dim=1)
    all_pixels = torch.cat([inputs["pixel_values"], expanded["pixel_values"]])

    calls = []
    handle = model.model.vision_tower.embeddings.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        continued = model.generate(input_ids=history, pixel_values=all_pixels, cache=cache,
                                   max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        handle.remove()
    assert calls == [1], "only the new image may be reduced"
    assert torch.equal(continued[:, : history.shape[1]], history)
    assert len(getattr(cache, PLAN_ATTRIBUTE).kept_tokens[0]) == 2

    scratch = model.generate(input_ids=history, pixel_values=all_pixels, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert continued[0, history.shape[1]:].tolist() == scratch[0, history.shape[1]:].tolist()

    with pytest.raises(ValueError, match="history"):
        model.generate(input_ids=history[:, 1:], pixel_values=all_pixels, cache=cache, max_new_tokens=2)


def test_multi_turn_with_user_cache_object(model, processor):
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    cache = DynamicCache()
    out = model.generate(**inputs, cache=cache, max_new_tokens=3, do_sample=False)
    assert getattr(cache, PLAN_ATTRIBUTE).compact_ids.shape[1] < out.shape[1]
    follow_up = processor.tokenizer(" USER: more? ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids
    history = torch.cat([out, follow_up], dim=1)
    continued = model.generate(input_ids=history, cache=cache, max_new_tokens=3, do_sample=False)
    scratch = model.generate(input_ids=history, pixel_values=inputs["pixel_values"], max_new_tokens=3, do_sample=False)
    assert continued[0, history.shape[1]:].tolist() == scratch[0, history.shape[1]:].tolist()


def test_beam_search_sampling_and_return_sequences(model, processor):
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, num_beams=3, num_return_sequences=2, max_new_tokens=4, do_sample=False)
    assert beams.shape == (2, prompt_length + 4)
    assert torch.equal(beams[:, :prompt_length], inputs["input_ids"].expand(2, -1))

    torch.manual_seed(123)
    sampled_a = model.generate(**inputs, do_sample=True, num_return_sequences=3, max_new_tokens=4)
    torch.manual_seed(123)
    sampled_b = model.generate(**inputs, do_sample=True, num_return_sequences=3, max_new_tokens=4)
    assert sampled_a.shape == (3, prompt_length + 4) and torch.equal(sampled_a, sampled_b)


def test_max_length_counts_the_prompt_as_given(model, processor):
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_length=prompt_length + 5, min_length=prompt_length + 5, do_sample=False)
    assert out.shape[1] == prompt_length + 5
    with pytest.raises(ValueError, match="max_length"):
        model.generate(**inputs, max_length=prompt_length - 1)


def test_streamer_skips_the_prompt(model, processor):
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
    streamed = "".join(streamer)
    assert streamed == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_static_cache(model, processor):
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    dynamic = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    static = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_placeholder_mismatch_raises_before_the_vision_tower(model, processor):
    inputs = processor(images=images(2), text=[PROMPTS[1]], return_tensors="pt")
    calls = []
    handle = model.model.vision_tower.embeddings.register_forward_hook(lambda *a: calls.append(1))
    first_placeholder = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0, 0])
    ids = inputs["input_ids"]
    short_run = torch.cat([ids[:, :first_placeholder], ids[:, first_placeholder + 5:]], 1)
    try:
        with pytest.raises(ValueError, match="placeholders"):
            model.generate(input_ids=short_run, pixel_values=inputs["pixel_values"], max_new_tokens=2)
        broken = inputs["input_ids"].clone()
        broken[0, (broken[0] == model.config.image_token_id).nonzero()[0, 0]] = 5
        with pytest.raises(ValueError, match="placeholders"):
            model.generate(input_ids=broken, pixel_values=inputs["pixel_values"], max_new_tokens=2)
        with pytest.raises(ValueError, match="pixel_values"):
            model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1], max_new_tokens=2)
        with pytest.raises(ValueError, match="placeholders"):
            model(input_ids=short_run, pixel_values=inputs["pixel_values"])
    finally:
        handle.remove()
    assert calls == []


def test_placeholders_without_images_raise(model, processor):
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    with pytest.raises(ValueError, match="placeholders"):
        model.generate(input_ids=inputs["input_ids"], max_new_tokens=2)
    with pytest.raises(ValueError, match="pixel_values"):
        model(input_ids=inputs["input_ids"])


def test_prompt_already_expanded_to_the_fixed_budget_takes_the_same_path(config_kwargs, processor):
    model = _build(LlavaVisionZipForConditionalGeneration, config_kwargs)
    prompt_images = images(1)
    inputs = processor(images=prompt_images, text=[PROMPTS[0]], return_tensors="pt")
    full = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    short_text = PROMPTS[0].replace("<image>", "<image>" * model.config.tokens_per_image)
    short_ids = processor.tokenizer(short_text, return_tensors="pt").input_ids
    short = model.generate(input_ids=short_ids, pixel_values=inputs["pixel_values"], max_new_tokens=NEW_TOKENS,
                           do_sample=False)
    assert full[0, inputs["input_ids"].shape[1]:].tolist() == short[0, short_ids.shape[1]:].tolist()


def test_batched_beam_search_rows_equal_each_prompt_alone(model, processor):
    groups = [images(1, seed=1), images(2, seed=2)]
    inputs = processor(images=[i for g in groups for i in g], text=PROMPTS[:2], return_tensors="pt", padding=True)
    out = model.generate(**inputs, num_beams=3, num_return_sequences=2, max_new_tokens=4, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    for row, (prompt, group) in enumerate(zip(PROMPTS[:2], groups)):
        single = processor(images=group, text=[prompt], return_tensors="pt")
        alone = model.generate(**single, num_beams=3, num_return_sequences=2, max_new_tokens=4, do_sample=False)
        assert out[2 * row : 2 * row + 2, prompt_length:].tolist() == alone[:, single["input_ids"].shape[1]:].tolist()


def test_generate_with_disk_offload_matches_in_memory(config_kwargs, processor, tmp_path):
    model = _build(LlavaVisionZipForConditionalGeneration, config_kwargs)
    model.save_pretrained(tmp_path / "checkpoint")
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    offloaded = LlavaVisionZipForConditionalGeneration.from_pretrained(
        tmp_path / "checkpoint", device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload"
    )
    assert set(offloaded.hf_device_map.values()) == {"disk"}
    offloaded.generation_config.suppress_tokens = model.generation_config.suppress_tokens
    assert torch.equal(offloaded.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False), expected)
