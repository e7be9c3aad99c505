"""Loading for evaluation (no lmms-eval needed): load-time overrides, refusals before any weight is loaded
into the wrong class, the TRIM processor check, which text TRIM scores, and prompt building."""

import pytest
import torch
from PIL import Image

import eval_support as support
from llava_token_reduction.evaluation.batching import (
    ChatPrompt,
    ReducedLlavaRunner,
    cut_at_stop_strings,
    prompt_from_text,
)
from llava_token_reduction.evaluation.loading import load_for_evaluation
from llava_token_reduction.methods import METHODS
from llava_token_reduction.tiny import build_processor


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation_loading")
    trim_with_stock_processor = root / "trim_stock_processor"
    support.save_trim_checkpoint(trim_with_stock_processor)
    build_processor().save_pretrained(trim_with_stock_processor)  # replaces the TRIM processor
    checkpoints = {"visionzip": support.save_visionzip_checkpoint(root / "visionzip"),
                   "trim": support.save_trim_checkpoint(root / "trim"),
                   "stock": support.save_stock_checkpoint(root / "stock"),
                   "trim_stock_processor": str(trim_with_stock_processor)}
    for name in METHODS:  # every other method of the registry (PruMerge), built the registry's way
        checkpoints.setdefault(name, support.save_method_checkpoint(root / name, name))
    return checkpoints


def test_config_fields_are_load_time_overrides(saved):
    loaded = load_for_evaluation(saved["visionzip"], overrides={"dominant_tokens": 6, "contextual_tokens": 2.0,
                                                                "visionzip_layer": -1.0})
    config = loaded.model.config
    assert (config.dominant_tokens, config.contextual_tokens, config.visionzip_layer) == (6, 2, -1)
    assert all(isinstance(v, int) for v in (config.contextual_tokens, config.visionzip_layer))
    trim = load_for_evaluation(saved["trim"], overrides={"trim_max_tokens": 3, "trim_min_tokens": "None"})
    assert trim.model.config.trim_max_tokens == 3 and trim.model.config.trim_min_tokens is None


def test_unknown_option_is_refused_by_name(saved):
    with pytest.raises(ValueError, match="dominant_tokenz"):
        load_for_evaluation(saved["visionzip"], overrides={"dominant_tokenz": 6})


def test_invalid_budget_is_refused(saved):
    with pytest.raises(ValueError, match="dominant_tokens"):
        load_for_evaluation(saved["visionzip"], overrides={"dominant_tokens": 0})


def test_stock_checkpoint_loads_unreduced_or_reduced(saved):
    baseline = load_for_evaluation(saved["stock"])
    assert baseline.method is None and type(baseline.model).__name__ == "LlavaForConditionalGeneration"
    reduced = load_for_evaluation(saved["stock"], method="visionzip",
                                  overrides={"dominant_tokens": 6, "contextual_tokens": 2})
    assert reduced.method.name == "visionzip"
    assert type(reduced.model).__name__ == "LlavaVisionZipForConditionalGeneration"
    assert reduced.model.config.dominant_tokens == 6
    for name, tensor in baseline.model.state_dict().items():
        assert torch.equal(tensor, reduced.model.state_dict()[name]), name


@pytest.mark.parametrize("checkpoint,kwargs,message", [
    ("stock", {"expected_method": "visionzip"}, "stock 'llava' checkpoint: pass method=visionzip"),
    ("stock", {"expected_method": "trim"}, "stock 'llava' checkpoint"),
    ("visionzip", {"expected_method": "trim"}, "is a visionzip checkpoint"),
    ("trim", {"method": "visionzip"}, "cannot be evaluated with method=visionzip"),
    ("stock", {"method": "trim"}, "convert trim"),
    ("stock", {"method": "tome"}, "unknown reduction method 'tome'; choose from visionzip, trim, prumerge"),
    ("stock", {"expected_method": "prumerge"}, "stock 'llava' checkpoint: pass method=prumerge"),
    ("prumerge", {"method": "visionzip"}, "is a prumerge checkpoint ('llava_prumerge')"),
    ("prumerge", {"expected_method": "trim"}, "is a prumerge checkpoint: use --model llava_prumerge"),
    ("trim_stock_processor", {}, "clip_input_ids"),
])
def test_refusals_name_the_problem(saved, checkpoint, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_for_evaluation(saved[checkpoint], **kwargs)


def test_stock_checkpoint_reduced_as_prumerge_plus_at_load_time(saved):
    """`method=prumerge` with its registry fields as overrides: the PruMerge class on the stock weights, unchanged."""
    baseline = load_for_evaluation(saved["stock"])
    loaded = load_for_evaluation(saved["stock"], method="prumerge", expected_method="prumerge",
                                 overrides={"prumerge_plus": True, "prumerge_max_tokens": 5.0,
                                            "prumerge_iqr_multiplier": 1})
    assert loaded.method.name == "prumerge"
    assert type(loaded.model).__name__ == "LlavaPruMergeForConditionalGeneration"
    config = loaded.model.config
    assert (config.prumerge_plus, config.prumerge_max_tokens, config.prumerge_iqr_multiplier) == (True, 5, 1.0)
    assert isinstance(config.prumerge_max_tokens, int)
    for name, tensor in baseline.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    saved_one = load_for_evaluation(saved["prumerge"], expected_method="prumerge")
    assert saved_one.method.name == "prumerge" and not saved_one.model.config.prumerge_plus


def test_every_registered_field_is_a_load_time_override(saved):
    """Each method's registry options are accepted by name on its own checkpoint (and refused on another's)."""
    for name, method in METHODS.items():
        for option in method.options:
            value = option.default if option.default is not None else 3
            loaded = load_for_evaluation(saved[name], overrides={option.field: value})
            assert getattr(loaded.model.config, option.field) == value, (name, option.field)
    with pytest.raises(ValueError, match="prumerge_plus"):
        load_for_evaluation(saved["visionzip"], overrides={"prumerge_plus": True})


def test_prumerge_batched_reports_equal_alone(saved):
    """The runner on PruMerge: a batch gives each prompt's answer alone, and each row's kept count is the number of
    tokens `get_image_features` returns for its image (the count varies per image: 13 to 15 here)."""
    loaded = load_for_evaluation(saved["stock"], method="prumerge")
    runner = ReducedLlavaRunner(loaded)
    images = [support.picture(seed, size=(56 + 8 * seed, 56)) for seed in range(3)]
    prompts = [prompt_from_text(f"<image>\n{question}", [image])
               for question, image in zip(support.QUESTIONS, images)]
    batched = runner.generate(prompts, {"max_new_tokens": 4})
    alone = [runner.generate([prompt], {"max_new_tokens": 4})[0] for prompt in prompts]
    assert [text for text, _ in batched] == [text for text, _ in alone]
    for image, (_, report) in zip(images, batched):
        pixels = loaded.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            [features] = loaded.model.model.get_image_features(pixel_values=pixels).pooler_output
        assert report.image_tokens == len(features) < report.image_placeholders
    assert len({report.image_tokens for _, report in batched}) > 1


def test_which_text_trim_scores(saved):
    loaded = load_for_evaluation(saved["trim"])
    image = support.picture(0)
    text = f"Is it day? {support.SUFFIX}"
    prompt = ChatPrompt(messages=[{"role": "user", "content": [{"type": "image", "image": image},
                                                               {"type": "text", "text": text}]}], images=[image])
    assert ReducedLlavaRunner(loaded).questions(prompt) == [text]
    assert ReducedLlavaRunner(loaded, trim_question="no_format").questions(prompt) == ["Is it day?"]
    assert ReducedLlavaRunner(loaded, trim_question="empty").questions(prompt) == [""]
    with pytest.raises(ValueError, match="trim_question"):
        ReducedLlavaRunner(loaded, trim_question="question_only")
    # The default goes to the model as the CLIP question of the image: the whole user turn.
    inputs = ReducedLlavaRunner(loaded).encode([prompt], ["USER: <image>\n" + text + " ASSISTANT:"])
    expected = loaded.processor.clip_tokenizer(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert inputs["clip_input_ids"][0].tolist() == expected


def test_prompt_from_text_places_images():
    a, b = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), "white")
    first = prompt_from_text("Compare them.", [a, b])
    assert [part["type"] for part in first.messages[0]["content"]] == ["image", "image", "text"]
    inline = prompt_from_text("Left: <image> right: <image> which is brighter?", [a, b])
    assert [(p["type"], p.get("text")) for p in inline.messages[0]["content"]] == [
        ("text", "Left:"), ("image", None), ("text", "right:"), ("image", None), ("text", "which is brighter?")]
    mismatched = prompt_from_text("<image> Describe.", [a, b])
    assert mismatched.messages[0]["content"][-1] == {"type": "text", "text": "Describe."}


def test_stop_strings_cut_at_the_first_one():
    assert cut_at_stop_strings("yes.\nUSER: more", ["\n", "USER:"]) == "yes."
    assert cut_at_stop_strings("no stop here", ["\n\n"]) == "no stop here"
    assert cut_at_stop_strings("abc", []) == "abc"


def test_hub_id_from_the_hub_cache_offline(saved, tmp_path):
    """A hub id resolves through a hub-style cache (`models--owner--name/snapshots/<rev>/`, `refs/main`) offline."""
    import os
    import subprocess
    import sys

    from conversion_inputs import add_to_hub_cache

    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "someone/tiny-llava", saved["stock"])
    script = (
        "from llava_token_reduction.evaluation.loading import load_for_evaluation\n"
        "loaded = load_for_evaluation('someone/tiny-llava', method='visionzip', overrides={'dominant_tokens': 6})\n"
        "print(type(loaded.model).__name__, loaded.model.config.dominant_tokens)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["LlavaVisionZipForConditionalGeneration", "6"]


def test_stock_llava_next_checkpoint_evaluates_reduced_without_type_warnings(tmp_path):
    """A stock LLaVA-NeXT checkpoint with method=visionzip loads as LLaVA-NeXT VisionZip (budget per crop), quietly,
    and the runner's batched answers equal each prompt alone (images of different grids in one batch)."""
    import logging

    from llava_token_reduction.tiny_next import build_next_processor, stock_next_model

    stock_next_model(seed=0).save_pretrained(tmp_path)
    build_next_processor().save_pretrained(tmp_path)
    messages = []

    class Recorder(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("transformers.configuration_utils")
    recorder = Recorder(level=logging.WARNING)
    logger.addHandler(recorder)
    try:
        loaded = load_for_evaluation(str(tmp_path), method="visionzip",
                                     overrides={"dominant_tokens": 6, "contextual_tokens": 2})
    finally:
        logger.removeHandler(recorder)
    assert type(loaded.model).__name__ == "LlavaNextVisionZipForConditionalGeneration"
    assert not [m for m in messages if "to instantiate a model of type" in m], messages
    runner = ReducedLlavaRunner(loaded)
    images = [Image.new("RGB", (90, 50), (200, 10, 10)), Image.new("RGB", (40, 120), (10, 200, 10))]
    prompts = [prompt_from_text("<image>\nWhat is it?", [images[0]]),
               prompt_from_text("<image>\nWhat color?", [images[1]])]
    batched = runner.generate(prompts, {"max_new_tokens": 5})
    alone = [runner.generate([prompt], {"max_new_tokens": 5})[0] for prompt in prompts]
    assert [text for text, _ in batched] == [text for text, _ in alone]
    assert [report.image_tokens for _, report in batched] == [report.image_tokens for _, report in alone]
    assert all(report.image_tokens < report.image_placeholders for _, report in batched)
    # Saved as it loaded, it is a LLaVA-NeXT VisionZip checkpoint, which the plugin takes as VisionZip.
    loaded.model.save_pretrained(tmp_path / "reduced")
    loaded.processor.save_pretrained(tmp_path / "reduced")
    again = load_for_evaluation(str(tmp_path / "reduced"), expected_method="visionzip")
    assert again.method.name == "visionzip" and again.model.config.model_type == "llava_next_visionzip"
    assert again.model.config.dominant_tokens == 6


def test_serving_and_the_guide_cover_every_registered_method():
    """`serve` adapts transformers' look-ups for every reduced model type of the registry (PruMerge's and
    LLaVA-NeXT VisionZip's too), and docs/evaluation.md names every method's `--model` and fields."""
    from pathlib import Path

    from llava_token_reduction.serve import served_model_classes

    classes = served_model_classes()
    assert {"llava_visionzip", "llava_next_visionzip", "llava_trim", "llava_prumerge"} <= set(classes)
    assert classes["llava_prumerge"].__name__ == "LlavaPruMergeForConditionalGeneration"
    guide = (Path(__file__).resolve().parent.parent / "docs" / "evaluation.md").read_text(encoding="utf-8")
    for name, method in METHODS.items():
        assert f"`llava_{name}`" in guide, name
        for option in method.options:
            assert f"`{option.field}`" in guide, (name, option.field)
