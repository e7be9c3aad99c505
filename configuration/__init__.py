from .configuration_llava_visionzip import LlavaVisionZipConfig

__all__ = ["LlavaVisionZipConfig"]
