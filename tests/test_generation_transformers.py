"""The generation mechanism against what transformers 5.24 does with any LLaVA model: `cache=` (and its
deprecated alias), compiled decoding, assisted generation, `torch.compile(model)`, inner models loaded by
`AutoModel`, and placeholder counts that come from the image rather than a stale config.

Reference: stock `LlavaForConditionalGeneration` / `LlavaModel` with the same weights, fed exactly `k_i`
placeholders per image and the reduced features.
"""

import warnings

import pytest
import torch
from transformers import (
    AutoModel,
    CompileConfig,
    DynamicCache,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    pipeline,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from generation_support import NEW_TOKENS, PROMPTS, images, reference_new_tokens
from llava_token_reduction import LlavaVisionZipConfig, LlavaVisionZipForConditionalGeneration
from llava_token_reduction.modeling.reduced_generation import PLAN_ATTRIBUTE
from llava_token_reduction.tiny import llava_config_kwargs


@pytest.fixture(scope="module")
def processor(tiny_processor):
    return tiny_processor


@pytest.fixture(scope="module")
def config_kwargs(processor):
    return llava_config_kwargs(tokenizer=processor.tokenizer)


def build(config_kwargs, seed=0, suppress=True, **overrides):
    torch.manual_seed(seed)
    config = LlavaVisionZipConfig(**{**config_kwargs, **overrides}, dominant_tokens=8, contextual_tokens=4)
    model = LlavaVisionZipForConditionalGeneration(config).eval()
    if suppress:
        model.generation_config.suppress_tokens = [config_kwargs["image_token_index"]]
    return model


def stock_twin(model, config_kwargs, suppress=True):
    stock = LlavaForConditionalGeneration(LlavaConfig(**config_kwargs)).eval()
    stock.load_state_dict(model.state_dict())
    if suppress:
        stock.generation_config.suppress_tokens = [config_kwargs["image_token_index"]]
    return stock


@pytest.fixture(scope="module")
def model(config_kwargs):
    return build(config_kwargs)


@pytest.fixture(scope="module")
def reference(model, config_kwargs):
    return stock_twin(model, config_kwargs)


def reduced_prompt(model, processor, prompt, pixel_values):
    """The prompt with exactly k_i placeholders per image, and the features to place there."""
    features = list(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
    pieces = prompt.split("<image>")
    text = pieces[0] + "".join("<image>" * len(f) + piece for f, piece in zip(features, pieces[1:]))
    ids = processor.tokenizer(text, return_tensors="pt").input_ids
    return ids, {"image": BaseModelOutputWithPooling(pooler_output=features)}


# -- cache= and its alias --------------------------------------------------------------------------------

def second_turn(processor, first_sequences, first_pixels, seed=6):
    turn = processor.tokenizer(" USER: <image>\nAnd this one? ASSISTANT:", add_special_tokens=False,
                               return_tensors="pt").input_ids
    expanded = processor(images=images(1, seed=seed), text=["<image>"], return_tensors="pt", add_special_tokens=False)
    turn_ids = torch.cat([turn[:, :7], expanded["input_ids"], turn[:, 8:]], dim=1)
    return torch.cat([first_sequences, turn_ids], dim=1), torch.cat([first_pixels, expanded["pixel_values"]])


def test_multi_turn_with_cache_is_warning_free_and_equals_from_scratch(model, processor):
    inputs = processor(images=images(1, seed=5), text=["USER: <image>\nWhat is it? ASSISTANT:"], return_tensors="pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        first = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
        history, pixels = second_turn(processor, first.sequences, inputs["pixel_values"])
        new_only = pixels[1:]
        continued = model.generate(input_ids=history, pixel_values=new_only, cache=first.cache,
                                   max_new_tokens=NEW_TOKENS, do_sample=False)
    assert len(getattr(first.cache, PLAN_ATTRIBUTE).kept_tokens[0]) == 2
    scratch = model.generate(input_ids=history, pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert continued[0, history.shape[1]:].tolist() == scratch[0, history.shape[1]:].tolist()


def test_the_deprecated_alias_still_continues_with_transformers_own_warning(model, processor):
    inputs = processor(images=images(1, seed=5), text=["USER: <image>\nWhat is it? ASSISTANT:"], return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    history, pixels = second_turn(processor, first.sequences, inputs["pixel_values"])
    with pytest.warns(FutureWarning, match="past_key_values"):
        continued = model.generate(input_ids=history, pixel_values=pixels, past_key_values=first.cache,
                                   max_new_tokens=NEW_TOKENS, do_sample=False)
    scratch = model.generate(input_ids=history, pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert continued[0, history.shape[1]:].tolist() == scratch[0, history.shape[1]:].tolist()
    with pytest.warns(FutureWarning, match="past_key_values"):
        model(input_ids=history[:, -3:], past_key_values=DynamicCache())


def test_forward_with_pixels_and_a_filled_cache_is_refused(model, processor):
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    cache = model(**inputs, use_cache=True).cache
    assert cache.get_seq_length() > 0
    for name in ("cache", "past_key_values"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with pytest.raises(NotImplementedError, match="filled cache"):
                model(**inputs, **{name: cache})


def test_a_generated_image_token_id_is_an_ordinary_token_while_decoding(config_kwargs, processor):
    """Force the image-token id as the first new token: the next decoding steps carry it in `input_ids`
    with a filled cache, which stock LLaVA treats as text; so must we."""
    model = build(config_kwargs, suppress=False)
    stock = stock_twin(model, config_kwargs, suppress=False)
    image_id = config_kwargs["image_token_index"]
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    ids, encoded = reduced_prompt(model, processor, PROMPTS[0], inputs["pixel_values"])
    vocabulary = list(range(model.config.text_config.vocab_size))

    def force_image_first(batch, sequence):  # generate sees the compact prompt, as long as `ids`
        return [image_id] if sequence.shape[0] == ids.shape[1] else vocabulary

    ours = model.generate(**inputs, max_new_tokens=4, do_sample=False, prefix_allowed_tokens_fn=force_image_first)
    theirs = stock.generate(input_ids=ids, mm_encoder_outputs=encoded, max_new_tokens=4, do_sample=False,
                            prefix_allowed_tokens_fn=force_image_first)
    assert ours[0, prompt_length] == image_id
    assert ours[0, prompt_length:].tolist() == theirs[0, ids.shape[1]:].tolist()


def test_static_cache_with_fullgraph_compiled_decoding(model, processor):
    """`_can_compile_fullgraph = True`: a decoding step must hold no data-dependent Python branch. The
    "eager" backend traces with dynamo (fullgraph fails on such a branch) without inductor's compile time."""
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles only on accelerators otherwise
    torch._dynamo.reset()
    compiled = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation="static",
                              compile_config=compile_config)
    assert torch.equal(compiled, expected)
    torch._dynamo.reset()


# -- placeholder counts from the image -------------------------------------------------------------------

@pytest.mark.parametrize("stale", [576, 20])
def test_a_stale_image_seq_length_does_not_matter(config_kwargs, processor, stale):
    """The processor expands `<image>` from the pixels (64 here); the config's `image_seq_length` may say
    anything (older saves, configs built by hand): generate, forward and the pipeline follow the pixels."""
    model = build(config_kwargs, image_seq_length=stale)
    assert model.config.image_seq_length == stale
    good = build(config_kwargs)
    for prompt in PROMPTS:
        prompt_images = images(prompt.count("<image>"), seed=3)
        inputs = processor(images=prompt_images or None, text=[prompt], return_tensors="pt")
        assert torch.equal(model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False),
                           good.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False))
    inputs = processor(images=images(2, seed=3), text=[PROMPTS[3]], return_tensors="pt")
    torch.testing.assert_close(model(**inputs).logits, good(**inputs).logits)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    chat = [{"role": "user", "content": [{"type": "image", "image": images(1)[0]}, {"type": "text", "text": "What?"}]}]
    expected = pipeline("image-text-to-text", model=good, processor=processor)(
        text=chat, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert pipe(text=chat, max_new_tokens=NEW_TOKENS, do_sample=False) == expected


def test_a_custom_vision_size_with_the_default_image_seq_length(config_kwargs):
    """A config built by hand for 70-px images keeps `LlavaConfig`'s default `image_seq_length` (576); the
    processor emits the 10x10 patch grid, and generate and the pipeline must follow it, as stock LLaVA does."""
    from llava_token_reduction.tiny import TinyShape, build_processor

    shape = TinyShape(image_size=70)
    big = build_processor(shape)
    vision = config_kwargs["vision_config"].to_dict() | {"image_size": 70}
    kwargs = {**config_kwargs, "vision_config": vision}
    kwargs.pop("image_seq_length")
    model = build(kwargs)
    assert model.config.image_seq_length == 576
    stock = stock_twin(model, kwargs)
    inputs = big(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 100
    assert model.model.image_placeholder_counts(inputs["pixel_values"]) == [100]
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == reference_new_tokens(
        model, stock, big, PROMPTS[0], images(1)).tolist()
    chat = [{"role": "user", "content": [{"type": "image", "image": images(1)[0]}, {"type": "text", "text": "What?"}]}]
    pipe = pipeline("image-text-to-text", model=model, processor=big)
    text = pipe(text=chat, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert text[0]["generated_text"]


# -- inner models ----------------------------------------------------------------------------------------

def test_inner_model_compacts_stock_prompts_like_stock_llava_model(model, config_kwargs, processor, tmp_path):
    model.save_pretrained(tmp_path)
    inner = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(inner).__name__ == "LlavaVisionZipModel"
    stock = LlavaModel(LlavaConfig(**config_kwargs)).eval()
    stock.load_state_dict(model.model.state_dict())
    for prompt in PROMPTS[:2]:
        inputs = processor(images=images(prompt.count("<image>"), seed=2), text=[prompt], return_tensors="pt")
        ours = inner(**inputs).last_hidden_state
        ids, encoded = reduced_prompt(model, processor, prompt, inputs["pixel_values"])
        expected = stock(input_ids=ids, mm_encoder_outputs=encoded).last_hidden_state
        assert ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pixel_values"):
        inner(input_ids=inputs["input_ids"])


def test_inner_model_batch_with_padding_matches_rows_alone(model, processor):
    groups = [images(1, seed=1), images(2, seed=2)]
    inputs = processor(images=[i for g in groups for i in g], text=PROMPTS[:2], return_tensors="pt", padding=True)
    batch = model.model(**inputs).last_hidden_state
    for row, (prompt, group) in enumerate(zip(PROMPTS[:2], groups)):
        alone = model.model(**processor(images=group, text=[prompt], return_tensors="pt")).last_hidden_state
        torch.testing.assert_close(batch[row, -alone.shape[1]:], alone[0], atol=1e-4, rtol=1e-4)


# -- assisted generation ---------------------------------------------------------------------------------

def test_assisted_generation_with_ours_as_assistant_and_as_main(model, reference, processor):
    """Greedy assisted decoding returns the main model's own greedy output, whoever drafts."""
    inputs = processor(images=images(1, seed=4), text=[PROMPTS[0]], return_tensors="pt")
    draft = build_like(model, seed=7)
    stock_main = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(reference.generate(**inputs, assistant_model=model, max_new_tokens=NEW_TOKENS, do_sample=False),
                       stock_main)
    ours = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(model.generate(**inputs, assistant_model=reference, max_new_tokens=NEW_TOKENS, do_sample=False),
                       ours)
    assert torch.equal(model.generate(**inputs, assistant_model=draft, max_new_tokens=NEW_TOKENS, do_sample=False),
                       ours)


def build_like(model, seed):
    torch.manual_seed(seed)
    other = LlavaVisionZipForConditionalGeneration(model.config).eval()
    other.generation_config.suppress_tokens = model.generation_config.suppress_tokens
    return other


def test_position_ids_other_than_the_default_are_refused(model, processor):
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    default = torch.arange(inputs["input_ids"].shape[1])[None]
    out = model.generate(**inputs, position_ids=default, max_new_tokens=2, do_sample=False)
    assert torch.equal(out, model.generate(**inputs, max_new_tokens=2, do_sample=False))
    with pytest.raises(ValueError, match="position_ids"):
        model.generate(**inputs, position_ids=default + 3, max_new_tokens=2)
    with pytest.raises(ValueError, match="position_ids"):
        model(**inputs, position_ids=default * 2)


# -- errors before compute, torch.compile ----------------------------------------------------------------

def test_attention_mask_of_another_length_is_named_before_the_vision_tower(model, processor):
    inputs = processor(images=images(1), text=[PROMPTS[0]], return_tensors="pt")
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        for mask in (inputs["attention_mask"][:, 1:], torch.cat([inputs["attention_mask"]] * 2, dim=1)):
            with pytest.raises(ValueError, match="attention_mask"):
                model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                               attention_mask=mask, max_new_tokens=2)
            with pytest.raises(ValueError, match="attention_mask"):
                model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=mask)
            with pytest.raises(ValueError, match="attention_mask"):
                model.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], attention_mask=mask)
    finally:
        handle.remove()
    assert calls == []


def test_torch_compile_of_the_model_equals_eager(model, processor):
    inputs = processor(images=images(2, seed=1), text=[PROMPTS[1]], return_tensors="pt")
    expected = model(**inputs).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(**inputs).logits, expected)
    torch._dynamo.reset()


def test_an_edited_reply_rewinds_the_cache_to_where_the_histories_part(model, processor):
    inputs = processor(images=images(1, seed=5), text=[PROMPTS[0]], return_tensors="pt")
    first = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    edited = first.sequences.clone()
    edited[0, -3:] = torch.tensor(processor.tokenizer("xyz", add_special_tokens=False).input_ids)
    follow_up = processor.tokenizer(" USER: more? ASSISTANT:", add_special_tokens=False, return_tensors="pt").input_ids
    history = torch.cat([edited, follow_up], dim=1)
    cached_before = first.cache.get_seq_length()
    continued = model.generate(input_ids=history, cache=first.cache, max_new_tokens=NEW_TOKENS, do_sample=False)
    scratch = model.generate(input_ids=history, pixel_values=inputs["pixel_values"], max_new_tokens=NEW_TOKENS,
                             do_sample=False)
    assert continued[0, history.shape[1]:].tolist() == scratch[0, history.shape[1]:].tolist()
    assert first.cache.get_seq_length() == cached_before - 2 + follow_up.shape[1] + 3 + NEW_TOKENS - 1


def test_the_supported_transformers_range_is_stated_once_and_met():
    """pyproject.toml's floor is the README's and `.ci/run` reads it from there; the installed release meets it,
    and it has what the floor was raised for (`cache=` in LLaVA's `forward`)."""
    import inspect
    import pathlib
    import re

    import transformers
    from packaging.version import Version

    root = pathlib.Path(__file__).resolve().parents[1]
    floor = re.search(r'"transformers\s*>=\s*([0-9][0-9.]*),\s*<\s*([0-9]+)"', (root / "pyproject.toml").read_text())
    assert floor, "pyproject.toml must pin transformers as >=FLOOR,<MAJOR"
    stated = f"Supported transformers: {floor.group(1)} up to (not including) {floor.group(2)}"
    assert stated in (root / "README.md").read_text()
    assert "transformers==$floor" in (root / ".ci" / "run").read_text()  # the floor run when it is not the newest
    assert Version(floor.group(1)) <= Version(transformers.__version__) < Version(floor.group(2))
    assert "cache" in inspect.signature(LlavaForConditionalGeneration.forward).parameters
