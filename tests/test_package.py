"""The public surface promised in CONTRACT.md: exports and Auto-class registration on import."""

import pytest
from transformers import AutoConfig, LlavaNextProcessor, LlavaProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, MODEL_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

import llava_token_reduction
from llava_token_reduction import (
    LlavaNextVisionZipConfig,
    LlavaNextVisionZipForConditionalGeneration,
    LlavaNextVisionZipModel,
    LlavaTrimConfig,
    LlavaTrimForConditionalGeneration,
    LlavaTrimModel,
    LlavaTrimProcessor,
    LlavaVisionZipConfig,
    LlavaVisionZipForConditionalGeneration,
    LlavaVisionZipModel,
)


def test_exports():
    assert set(llava_token_reduction.__all__) == {
        "LlavaVisionZipConfig", "LlavaVisionZipModel", "LlavaVisionZipForConditionalGeneration",
        "LlavaTrimConfig", "LlavaTrimModel", "LlavaTrimForConditionalGeneration", "LlavaTrimProcessor",
        "LlavaNextVisionZipConfig", "LlavaNextVisionZipModel", "LlavaNextVisionZipForConditionalGeneration",
        "LlavaPruMergeConfig", "LlavaPruMergeModel", "LlavaPruMergeForConditionalGeneration",
    }


@pytest.mark.parametrize(
    "config_class, inner, outer, processor",
    [
        (LlavaVisionZipConfig, LlavaVisionZipModel, LlavaVisionZipForConditionalGeneration, LlavaProcessor),
        (LlavaTrimConfig, LlavaTrimModel, LlavaTrimForConditionalGeneration, LlavaTrimProcessor),
        (LlavaNextVisionZipConfig, LlavaNextVisionZipModel, LlavaNextVisionZipForConditionalGeneration,
         LlavaNextProcessor),
    ],
)
def test_auto_classes_resolve_both_model_types(config_class, inner, outer, processor):
    assert type(AutoConfig.for_model(config_class.model_type)) is config_class
    assert MODEL_MAPPING[config_class] is inner
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[config_class] is outer
    assert PROCESSOR_MAPPING[config_class] is processor
    assert outer.config_class is config_class and inner.config_class is config_class
