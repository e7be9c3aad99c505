from .configuration_llava_next_visionzip import LlavaNextVisionZipConfig
from .configuration_llava_prumerge import LlavaPruMergeConfig
from .configuration_llava_trim import LlavaTrimConfig
from .configuration_llava_visionzip import LlavaVisionZipConfig


__all__ = ["LlavaNextVisionZipConfig", "LlavaPruMergeConfig", "LlavaTrimConfig", "LlavaVisionZipConfig"]
