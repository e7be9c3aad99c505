"""`pipeline("image-text-to-text", ...)` on a saved reduced checkpoint: chat messages, plain prompts, batches."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from llava_token_reduction import LlavaVisionZipConfig, LlavaVisionZipForConditionalGeneration
from llava_token_reduction.tiny import build_processor, llava_config_kwargs


NEW_TOKENS = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    processor = build_processor()
    torch.manual_seed(0)
    config = LlavaVisionZipConfig(**llava_config_kwargs(tokenizer=processor.tokenizer), dominant_tokens=8, contextual_tokens=4)
    model = LlavaVisionZipForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [config.image_token_id]
    directory = tmp_path_factory.mktemp("visionzip_pipeline")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, model, processor


@pytest.fixture(scope="module")
def pipe(checkpoint):
    directory, _, _ = checkpoint
    return pipeline("image-text-to-text", model=str(directory), trust_remote_code=True)


def picture(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))


def expected_text(model, processor, prompt, image):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_plain_prompt(pipe, checkpoint):
    _, model, processor = checkpoint
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    result = pipe(images=picture(1), text=prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
    assert result[0]["generated_text"] == expected_text(model, processor, prompt, picture(1))
    full = pipe(images=picture(1), text=prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert full[0]["generated_text"] == prompt + result[0]["generated_text"]


def test_chat_messages(pipe, checkpoint):
    _, model, processor = checkpoint
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(2)},
                                              {"type": "text", "text": "Describe the picture."}]}]
    result = pipe(text=messages, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert result[0]["generated_text"] == expected_text(model, processor, prompt, picture(2))
    with_history = pipe(text=messages, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert with_history[0]["generated_text"][-1]["role"] == "assistant"
    assert with_history[0]["generated_text"][-1]["content"] == result[0]["generated_text"]


def test_batched_prompts(pipe, checkpoint):
    _, model, processor = checkpoint
    prompts = ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nA much longer question about it? ASSISTANT:"]
    results = pipe(images=[picture(3), picture(4)], text=prompts, max_new_tokens=NEW_TOKENS, do_sample=False,
                   return_full_text=False, batch_size=2)
    for result, prompt, seed in zip(results, prompts, (3, 4)):
        result = result[0] if isinstance(result, list) else result
        assert result["generated_text"] == expected_text(model, processor, prompt, picture(seed))
