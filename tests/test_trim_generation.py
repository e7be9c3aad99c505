"""TRIM through the shared generation mechanism, what only TRIM does: images of one batch keep different counts,
each image is scored against the question of the turn that brings it, the CLIP inputs are required; and the inner
model and `torch.compile` on TRIM's side inputs. Generate == stock LLaVA on the reduced prompt, batch == alone,
multi-turn with the cache and the pipeline run for every method in tests/test_all_methods.py and
tests/test_pipeline.py.

Reference: stock `LlavaModel` with the same weights on a prompt with exactly `k_i` placeholders per image, the
TRIM features placed there.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava_token_reduction.tiny import build_trim_processor
from methods_under_test import method_model, stock_twin


NEW_TOKENS = 5


@pytest.fixture(scope="module")
def processor():
    return build_trim_processor()


@pytest.fixture(scope="module")
def model(processor):
    model = method_model("trim", processor=processor)
    model.generation_config.suppress_tokens = [model.config.image_token_id]
    return model


def picture(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))


PROMPTS = [
    "USER: <image>\nwhat color is the car? ASSISTANT:",
    "USER: <image>\nhow many dogs are sitting on the grass near the red house? ASSISTANT:",
    "USER: <image>\nCompare this<image>\nwith that one. ASSISTANT:",
]


def test_images_of_one_batch_keep_different_counts(model, processor):
    """TRIM's count follows each image and its question, so one padded batch holds different counts (the shared
    batch == alone test then covers rows of different lengths)."""
    images = [[picture(1)], [picture(2)], [picture(3), picture(4)]]
    inputs = processor(images=[i for g in images for i in g], text=PROMPTS, return_tensors="pt", padding=True)
    counts = [len(f) for f in model.model.get_image_features(
        pixel_values=inputs["pixel_values"], clip_input_ids=inputs["clip_input_ids"],
        clip_attention_mask=inputs["clip_attention_mask"]).pooler_output]
    assert len(set(counts)) > 1, f"the images should keep different counts, got {counts}"


def test_a_new_turn_brings_its_own_question_to_clip(processor):
    """In a history, the CLIP rows of a new turn's image hold that turn's question, not an earlier one (the shared
    multi-turn test in tests/test_all_methods.py then checks the cached first image keeps its own count)."""
    new_turn = processor(images=[picture(8)], text=[" USER: <image>\nand how many dogs are there? ASSISTANT:"],
                         return_tensors="pt", add_special_tokens=False)
    questions = processor.clip_tokenizer.batch_decode(new_turn["clip_input_ids"], skip_special_tokens=True)
    assert "dogs" in questions[0] and "car" not in questions[0]


def test_missing_clip_inputs_raise_before_compute(model, processor):
    inputs = processor(images=[picture(1)], text=[PROMPTS[0]], return_tensors="pt")
    with pytest.raises(ValueError, match="clip_input_ids"):
        model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], max_new_tokens=2)


def test_inner_model_compacts_stock_prompts_like_stock_llava_model(model, processor):
    """`AutoModel` loads `LlavaTrimModel`: it takes the processor's prompt (and CLIP rows) and returns hidden
    states over the compact sequence, as stock `LlavaModel` does over the k_i-placeholder prompt."""
    stock = LlavaModel(stock_twin(model).config).eval()
    stock.load_state_dict({k: v for k, v in model.model.state_dict().items()
                           if not k.startswith(("clip_text_model", "visual_projection"))})
    prompt, images = PROMPTS[2], [picture(3), picture(4)]
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    ours = model.model(**inputs).last_hidden_state
    features = model.model.get_image_features(
        pixel_values=inputs["pixel_values"], clip_input_ids=inputs["clip_input_ids"],
        clip_attention_mask=inputs["clip_attention_mask"]).pooler_output
    pieces = prompt.split("<image>")
    text = pieces[0] + "".join("<image>" * len(f) + piece for f, piece in zip(features, pieces[1:]))
    ids = processor.tokenizer(text, return_tensors="pt").input_ids
    encoded = BaseModelOutputWithPooling(pooler_output=list(features))
    expected = stock(input_ids=ids, mm_encoder_outputs={"image": encoded})
    torch.testing.assert_close(ours, expected.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_torch_compile_of_the_model_equals_eager(model, processor):
    inputs = processor(images=[picture(5)], text=[PROMPTS[0]], return_tensors="pt")
    expected = model(**inputs).logits
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(**inputs).logits, expected)
    torch._dynamo.reset()
