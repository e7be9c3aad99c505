"""What the generation tests share (tests/test_generation.py, tests/test_generation_transformers.py): prompts with
zero, one and two images, seeded pictures of different sizes, and the stock-LLaVA reference of "the prompt with
exactly k_i placeholders per image, the reduced features placed there"."""

import numpy as np
from PIL import Image
from transformers.modeling_outputs import BaseModelOutputWithPooling


NEW_TOKENS = 6


def images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((60, 50 + 7 * i, 3)) * 255).astype("uint8")) for i in range(count)]


PROMPTS = [
    "USER: <image>\nWhat is shown here? ASSISTANT:",
    "USER: <image>\nCompare it with<image>\nplease, in detail. ASSISTANT:",
    "USER: Just text, no picture at all. ASSISTANT:",
    "USER: <image><image>\nTwo glued images. ASSISTANT:",
]


def reference_new_tokens(model, reference, processor, prompt, prompt_images, **generate_kwargs):
    """Stock LLaVA on the prompt with exactly k_i placeholders per image."""
    tokenizer = processor.tokenizer
    if not prompt_images:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = reference.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, **generate_kwargs)
        return out[0, ids.shape[1]:]
    pixels = processor.image_processor(prompt_images, return_tensors="pt").pixel_values
    features = model.model.get_image_features(pixel_values=pixels).pooler_output
    pieces = prompt.split("<image>")
    text = pieces[0] + "".join("<image>" * len(f) + piece for f, piece in zip(features, pieces[1:]))
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = reference.generate(
        input_ids=ids, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=list(features))},
        max_new_tokens=NEW_TOKENS, do_sample=False, **generate_kwargs,
    )
    return out[0, ids.shape[1]:]
