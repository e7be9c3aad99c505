from .modeling_llava_visionzip import LlavaVisionZipForConditionalGeneration, LlavaVisionZipModel

__all__ = ["LlavaVisionZipModel", "LlavaVisionZipForConditionalGeneration"]
