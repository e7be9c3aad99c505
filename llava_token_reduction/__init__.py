"""VisionZip and TRIM visual-token reduction for LLaVA, as Hugging Face Transformers models.

Importing this package registers the model types with transformers' Auto classes, so
`AutoModelForImageTextToText.from_pretrained(...)` resolves them without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

from .configuration import LlavaTrimConfig, LlavaVisionZipConfig
from .modeling import (
    LlavaTrimForConditionalGeneration,
    LlavaTrimModel,
    LlavaTrimProcessor,
    LlavaVisionZipForConditionalGeneration,
    LlavaVisionZipModel,
)


__version__ = "0.1.0"

AutoConfig.register(LlavaVisionZipConfig.model_type, LlavaVisionZipConfig, exist_ok=True)
AutoModel.register(LlavaVisionZipConfig, LlavaVisionZipModel, exist_ok=True)
AutoModelForImageTextToText.register(LlavaVisionZipConfig, LlavaVisionZipForConditionalGeneration, exist_ok=True)
# VisionZip needs nothing beyond the stock processor: the model shortens the prompt itself.
AutoProcessor.register(LlavaVisionZipConfig, LlavaProcessor, exist_ok=True)
AutoConfig.register(LlavaTrimConfig.model_type, LlavaTrimConfig, exist_ok=True)
AutoModel.register(LlavaTrimConfig, LlavaTrimModel, exist_ok=True)
AutoModelForImageTextToText.register(LlavaTrimConfig, LlavaTrimForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LlavaTrimConfig, LlavaTrimProcessor, exist_ok=True)

__all__ = [
    "LlavaVisionZipConfig",
    "LlavaVisionZipModel",
    "LlavaVisionZipForConditionalGeneration",
    "LlavaTrimConfig",
    "LlavaTrimModel",
    "LlavaTrimForConditionalGeneration",
    "LlavaTrimProcessor",
]
