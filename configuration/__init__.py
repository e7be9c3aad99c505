from .configuration_llava_prumerge import LlavaPruMergeConfig
from .configuration_llava_trim import LlavaTrimConfig
from .configuration_llava_visionzip import LlavaVisionZipConfig

__all__ = ["LlavaTrimConfig", "LlavaVisionZipConfig", "LlavaPruMergeConfig"]
