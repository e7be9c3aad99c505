"""LlavaTrimProcessor: which question each image gets, the 77-token CLIP rows, `clip_text=`, save/load."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaProcessor

from llava_token_reduction import LlavaTrimProcessor
from llava_token_reduction.modeling.processing_llava_trim import questions_from_prompt
from llava_token_reduction.tiny import (
    build_trim_processor,
)


LLAVA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)


@pytest.fixture(scope="module")
def processor():
    return build_trim_processor()


def image(seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (60, 60, 3), dtype=np.uint8))


def clip_rows(processor, questions):
    encoded = processor.clip_tokenizer(questions, padding="max_length", truncation=True, max_length=77,
                                       return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def assert_questions(processor, output, questions):
    ids, mask = clip_rows(processor, questions)
    assert output["clip_input_ids"].shape == (len(questions), 77)
    assert torch.equal(output["clip_input_ids"], ids), [
        processor.clip_tokenizer.decode(row, skip_special_tokens=True) for row in output["clip_input_ids"]
    ]
    assert torch.equal(output["clip_attention_mask"], mask)


@pytest.mark.parametrize("prompt,expected", [
    ("USER: <image>\nWhat is this? ASSISTANT:", ["What is this?"]),
    (f"{LLAVA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT:", ["What is this?"]),
    ("<image>\nWhat is this?", ["What is this?"]),
    ("<image>\nWhat is this? ASSISTANT:", ["What is this?"]),
    ("What is in <image> this picture?", ["What is in this picture?"]),
    ("USER: <image><image>\nCompare them. ASSISTANT:", ["Compare them.", "Compare them."]),
    ("USER: <image>\nQ one ASSISTANT: A one</s>USER: <image>\nQ two ASSISTANT:", ["Q one", "Q two"]),
    ("USER: <image>\nQ one ASSISTANT: A one</s>USER: And then? ASSISTANT:", ["Q one"]),
    ("USER: <image> ASSISTANT: ok</s>USER: What color? ASSISTANT:", [""]),
    ("<image>\nUSER: After the image. ASSISTANT:", ["After the image."]),
    ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n<image>\nWhat color?<|im_end|>\n"
     "<|im_start|>assistant\n", ["What color?"]),
    ("[INST] <image>\nWhat is shown? [/INST]", ["What is shown?"]),
    ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nDescribe. [/INST]", ["Describe."]),
    ("<|start_header_id|>system<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
     "<image>\nHow many dogs?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", ["How many dogs?"]),
    ("###Human: <image>\nWhat is it?###Assistant:", ["What is it?"]),
    ("A prompt without any image.", []),
])
def test_question_extraction(prompt, expected):
    assert questions_from_prompt(prompt, "<image>", ("<s>", "</s>")) == expected


def test_raw_prompt(processor):
    prompt = f"{LLAVA_SYSTEM} USER: <image>\nWhat color is the car? ASSISTANT:"
    out = processor(images=image(), text=prompt, return_tensors="pt")
    stock = LlavaProcessor(processor.image_processor, processor.tokenizer, patch_size=7,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1)
    reference = stock(images=image(), text=prompt, return_tensors="pt")
    for key in reference:  # everything the stock processor returns, unchanged
        assert torch.equal(out[key], reference[key])
    assert (out["input_ids"] == processor.image_token_id).sum() == 64
    assert_questions(processor, out, ["What color is the car?"])
    decoded = processor.clip_tokenizer.decode(out["clip_input_ids"][0], skip_special_tokens=True)
    assert decoded == "what color is the car ?"


def test_chat_template_string(processor):
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which animal is it?"}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert "You are terse." in prompt and "USER:" in prompt
    out = processor(images=image(), text=prompt, return_tensors="pt")
    assert_questions(processor, out, ["Which animal is it?"])


def test_apply_chat_template_tokenized_multi_turn_and_several_images(processor):
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
        {"role": "user", "content": [{"type": "image", "image": image(0)}, {"type": "image", "image": image(1)},
                                     {"type": "text", "text": "Compare"}, {"type": "text", "text": "these two."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": image(2)}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        {"role": "user", "content": [{"type": "text", "text": "Thanks, anything else?"}]},
    ]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert out["pixel_values"].shape[0] == 3
    assert_questions(processor, out, ["Compare these two.", "Compare these two.", "And this one?"])


def test_apply_chat_template_batch_and_image_without_text(processor):
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": image(0)}, {"type": "text", "text": "First?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": image(1)}]}],
    ]
    out = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", processor_kwargs={"padding": True})
    assert_questions(processor, out, ["First?", ""])
    # The empty question is CLIP's BOS, EOS, then padding.
    bos, eos = processor.clip_tokenizer.bos_token_id, processor.clip_tokenizer.eos_token_id
    assert out["clip_input_ids"][1, :2].tolist() == [bos, eos] and out["clip_attention_mask"][1].sum() == 2


def test_batch_of_prompts(processor):
    prompts = ["USER: <image>\nWhat is left? ASSISTANT:", "Just text, no image.",
               "USER: <image>\nWhat is right? <image> ASSISTANT:"]
    out = processor(images=[image(0), image(1), image(2)], text=prompts, padding=True, return_tensors="pt")
    assert out["input_ids"].shape[0] == 3 and out["pixel_values"].shape[0] == 3
    assert_questions(processor, out, ["What is left?", "What is right?", "What is right?"])


def test_clip_text_override_per_prompt_per_image_and_nested(processor):
    prompts = ["USER: <image><image>\nTwo? ASSISTANT:", "USER: <image>\nOne? ASSISTANT:"]
    images = [image(0), image(1), image(2)]
    per_prompt = processor(images=images, text=prompts, padding=True, return_tensors="pt", clip_text=["a", "b"])
    assert_questions(processor, per_prompt, ["a", "a", "b"])
    per_image = processor(images=images, text=prompts, padding=True, return_tensors="pt", clip_text=["x", "y", "z"])
    assert_questions(processor, per_image, ["x", "y", "z"])
    nested = processor(images=images, text=prompts, padding=True, return_tensors="pt", clip_text=[["p", "q"], ["r"]])
    assert_questions(processor, nested, ["p", "q", "r"])
    single = processor(images=image(), text="USER: <image>\nIgnored? ASSISTANT:", clip_text="the car",
                       return_tensors="pt")
    assert_questions(processor, single, ["the car"])


def test_clip_text_errors(processor):
    prompts = ["USER: <image><image>\nTwo? ASSISTANT:", "USER: <image>\nOne? ASSISTANT:"]
    images = [image(0), image(1), image(2)]
    with pytest.raises(ValueError, match="one string per prompt \\(2\\) or one per image \\(3\\)"):
        processor(images=images, text=prompts, padding=True, clip_text=["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="one list per prompt"):
        processor(images=images, text=prompts, padding=True, clip_text=[["a"], ["b"]])
    # 2 prompts and 2 images, but not one image each: ambiguous
    with pytest.raises(ValueError, match="disambiguate"):
        processor(images=[image(0), image(1)], text=["USER: <image><image> ASSISTANT:", "no image"], padding=True,
                  clip_text=["a", "b"])


def test_truncation_to_77_tokens(processor):
    question = " ".join(["word"] * 200)
    out = processor(images=image(), text=f"USER: <image>\n{question} ASSISTANT:", return_tensors="pt")
    row = out["clip_input_ids"][0]
    assert row.shape == (77,) and out["clip_attention_mask"][0].sum() == 77
    assert row[0] == processor.clip_tokenizer.bos_token_id and row[-1] == processor.clip_tokenizer.eos_token_id


def test_no_images_and_plain_lists(processor):
    out = processor(text="Hello there.", return_tensors="pt")
    assert out["clip_input_ids"].shape == (0, 77) and out["clip_attention_mask"].shape == (0, 77)
    lists = processor(images=image(), text="USER: <image>\nWhy? ASSISTANT:")
    assert isinstance(lists["clip_input_ids"], list) and len(lists["clip_input_ids"][0]) == 77


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "clip_tokenizer" / "tokenizer_config.json").exists()
    assert (tmp_path / "processing_llava_trim.py").exists()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LlavaTrimProcessor and loaded.chat_template == processor.chat_template
    prompt = "USER: <image>\nWhat is here? ASSISTANT:"
    a = processor(images=image(), text=prompt, return_tensors="pt")
    b = loaded(images=image(), text=prompt, return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "clip_input_ids" in loaded.model_input_names


@pytest.mark.parametrize("prompt,expected", [
    ("USER: <image>\nWhat does ASSISTANT: mean in a chat log? ASSISTANT:",
     ["What does ASSISTANT: mean in a chat log?"]),
    (f"{LLAVA_SYSTEM} USER: <image>\nWhat does ASSISTANT: mean in a chat log? ASSISTANT:",
     ["What does ASSISTANT: mean in a chat log?"]),
    ("USER: <image>\nIs USER: a role marker? ASSISTANT:", ["Is USER: a role marker?"]),
    ("<image>\nWhat does ASSISTANT: mean? ASSISTANT:", ["What does ASSISTANT: mean?"]),
    ("USER: <image>\nQ one ASSISTANT: A one</s>USER: <image>\nWhy write ASSISTANT: here? ASSISTANT:",
     ["Q one", "Why write ASSISTANT: here?"]),
    ("<|im_start|>user\n<image>\nWhat is <|im_start|>assistant in ChatML?<|im_end|>\n<|im_start|>assistant\n",
     ["What is assistant in ChatML?"]),
])
def test_role_markers_typed_inside_the_question_stay_in_it(prompt, expected):
    assert questions_from_prompt(prompt, "<image>", ("<s>", "</s>")) == expected


def test_role_marker_in_the_question_reaches_clip_whole(processor):
    prompt = "USER: <image>\nWhat does ASSISTANT: mean in a chat log? ASSISTANT:"
    out = processor(images=image(), text=prompt, return_tensors="pt")
    assert_questions(processor, out, ["What does ASSISTANT: mean in a chat log?"])
