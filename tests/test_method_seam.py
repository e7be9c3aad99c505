"""The seam between reduction methods and model families (modeling/method_base.py): one `get_image_features`
per family, and a method that is nothing but the seam's hooks plugs into the family's models and generation."""

import torch
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava_token_reduction import (
    LlavaTrimForConditionalGeneration,
    LlavaTrimModel,
    LlavaVisionZipConfig,
    LlavaVisionZipForConditionalGeneration,
    LlavaVisionZipModel,
)
from llava_token_reduction.modeling.family_llava import ReducedLlavaForConditionalGeneration, ReducedLlavaModel
from llava_token_reduction.modeling.method_base import CropReduction, ReductionMethodMixin
from llava_token_reduction.modeling.method_trim_model import TrimReduction
from llava_token_reduction.modeling.method_visionzip_model import VisionZipReduction


def test_one_get_image_features_template_per_family():
    """The methods' model sides and the public classes define no `get_image_features` of their own: the
    LLaVA-1.5 family's template is the only one, whatever the method."""
    for cls in (VisionZipReduction, TrimReduction, ReductionMethodMixin, LlavaVisionZipModel, LlavaTrimModel):
        assert "get_image_features" not in vars(cls), cls
    assert LlavaVisionZipModel.get_image_features is ReducedLlavaModel.get_image_features
    assert LlavaTrimModel.get_image_features is ReducedLlavaModel.get_image_features
    for outer in (LlavaVisionZipForConditionalGeneration, LlavaTrimForConditionalGeneration):
        assert issubclass(outer, ReducedLlavaForConditionalGeneration)
        assert outer.image_side_input_names == outer.inner_model_class.image_side_input_names


KEPT = 5  # tokens per image of the test method


class WindowReduction(ReductionMethodMixin):
    """A method made of the seam's hooks only: each image keeps `KEPT` consecutive tokens of hidden state -2,
    starting at its own `window_start` (a per-image side input)."""

    image_side_input_names = ("window_start",)

    def check_reduction_inputs(self, crops, num_images, side_inputs):
        if side_inputs.get("window_start") is None or len(side_inputs["window_start"]) != num_images:
            raise ValueError(f"`window_start` needs one row per image ({num_images})")

    def vision_states_needed(self):
        return [-2]

    def reduce_crops(self, states, image_of_crop, side_inputs):
        starts = side_inputs["window_start"][image_of_crop].tolist()
        tokens = [state[start : start + KEPT] for state, start in zip(states[0], starts)]
        return CropReduction(tokens=tokens, last_hidden_state=states[0])


class WindowModel(WindowReduction, ReducedLlavaModel):
    config_class = LlavaVisionZipConfig


class WindowForConditionalGeneration(ReducedLlavaForConditionalGeneration):
    config_class = LlavaVisionZipConfig
    inner_model_class = WindowModel


def test_a_method_of_the_seam_hooks_alone_runs_through_features_forward_and_generate(
    make_visionzip_config, make_pixel_values
):
    config = make_visionzip_config(dominant_tokens=KEPT, contextual_tokens=0)
    torch.manual_seed(0)
    model = WindowForConditionalGeneration(config).eval()
    assert WindowForConditionalGeneration.image_side_input_names == ("window_start",)
    stock = LlavaForConditionalGeneration(config).eval()
    stock.load_state_dict(model.state_dict())
    pixel_values, starts = make_pixel_values(batch=2, seed=4), torch.tensor([0, 3])

    with torch.no_grad():
        # Independent reference: stock tower's hidden state -2, the window of each image, the stock projector.
        states = stock.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
        reference = [stock.model.multi_modal_projector(states[i, s : s + KEPT]) for i, s in enumerate(starts.tolist())]
        features = model.model.get_image_features(pixel_values=pixel_values, window_start=starts).pooler_output
        for ours, expected in zip(features, reference, strict=True):
            torch.testing.assert_close(ours, expected)

        image = config.image_token_id
        full = [[1, 40 + i, 41] + [image] * config.image_seq_length + [50, 60] for i in range(2)]
        reduced = [[1, 40 + i, 41] + [image] * KEPT + [50, 60] for i in range(2)]
        logits = model(input_ids=torch.tensor(full), pixel_values=pixel_values, window_start=starts).logits
        encoded = {"image": BaseModelOutputWithPooling(pooler_output=reference)}
        expected = stock(input_ids=torch.tensor(reduced), mm_encoder_outputs=encoded).logits
        torch.testing.assert_close(logits, expected)

        generated = model.generate(input_ids=torch.tensor(full), pixel_values=pixel_values, window_start=starts,
                                   max_new_tokens=3, do_sample=False)
        stock_generated = stock.generate(input_ids=torch.tensor(reduced), mm_encoder_outputs=encoded,
                                         max_new_tokens=3, do_sample=False)
    assert torch.equal(generated[:, len(full[0]):], stock_generated[:, len(reduced[0]):])
