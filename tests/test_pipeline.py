"""`pipeline("image-text-to-text", ...)` on a saved checkpoint of every method (`methods_under_test.METHOD_NAMES`,
loaded with `trust_remote_code=True`): plain prompts, chat messages and batches give what `generate` gives."""

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline


NEW_TOKENS = 5


@pytest.fixture(scope="module")
def pipe(method_setup):
    return pipeline("image-text-to-text", model=str(method_setup.directory), trust_remote_code=True)


def picture(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))


def expected_text(setup, prompt, image):
    inputs = setup.processor(images=image, text=prompt, return_tensors="pt")
    out = setup.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return setup.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_pipeline_loads_the_methods_classes(pipe, method_setup):
    assert type(pipe.model).__name__ == type(method_setup.model).__name__
    assert type(pipe.processor).__name__ == type(method_setup.processor).__name__


def test_plain_prompt(pipe, method_setup):
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    result = pipe(images=picture(1), text=prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
    assert result[0]["generated_text"] == expected_text(method_setup, prompt, picture(1))
    full = pipe(images=picture(1), text=prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert full[0]["generated_text"] == prompt + result[0]["generated_text"]


def test_chat_messages(pipe, method_setup):
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(2)},
                                              {"type": "text", "text": "Describe the picture."}]}]
    result = pipe(text=messages, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
    prompt = method_setup.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert result[0]["generated_text"] == expected_text(method_setup, prompt, picture(2))
    with_history = pipe(text=messages, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert with_history[0]["generated_text"][-1]["role"] == "assistant"
    assert with_history[0]["generated_text"][-1]["content"] == result[0]["generated_text"]


def test_batched_prompts(pipe, method_setup):
    prompts = ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nA much longer question about it? ASSISTANT:"]
    results = pipe(images=[picture(3), picture(4)], text=prompts, max_new_tokens=NEW_TOKENS, do_sample=False,
                   return_full_text=False, batch_size=2)
    for result, prompt, seed in zip(results, prompts, (3, 4)):
        result = result[0] if isinstance(result, list) else result
        assert result["generated_text"] == expected_text(method_setup, prompt, picture(seed))
