from .modeling_llava_next_visionzip import LlavaNextVisionZipForConditionalGeneration, LlavaNextVisionZipModel
from .modeling_llava_prumerge import LlavaPruMergeForConditionalGeneration, LlavaPruMergeModel
from .modeling_llava_trim import LlavaTrimForConditionalGeneration, LlavaTrimModel
from .modeling_llava_visionzip import LlavaVisionZipForConditionalGeneration, LlavaVisionZipModel
from .processing_llava_trim import LlavaTrimProcessor


__all__ = [
    "LlavaVisionZipModel",
    "LlavaVisionZipForConditionalGeneration",
    "LlavaTrimModel",
    "LlavaTrimForConditionalGeneration",
    "LlavaTrimProcessor",
    "LlavaNextVisionZipModel",
    "LlavaNextVisionZipForConditionalGeneration",
    "LlavaPruMergeModel",
    "LlavaPruMergeForConditionalGeneration",
]
