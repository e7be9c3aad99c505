"""VisionZip and TRIM visual-token reduction for LLaVA, as Hugging Face Transformers models.

Importing this package registers every method of the registry (`llava_token_reduction.methods.METHODS`) with
transformers' Auto classes, so `AutoModelForImageTextToText.from_pretrained(...)` resolves them without remote
code. The public classes are those the `configuration` and `modeling` packages export; a new method adds its
classes there and its entry to the registry, and needs no edit here.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, LlavaNextProcessor

from . import configuration, modeling
from .configuration import *  # noqa: F403 - the config classes, listed in configuration.__all__
from .methods import METHODS
from .modeling import *  # noqa: F403 - the model and processor classes, listed in modeling.__all__


__version__ = "0.1.0"

for _method in METHODS.values():
    AutoConfig.register(_method.model_type, _method.config_class, exist_ok=True)
    AutoModel.register(_method.config_class, _method.model_class, exist_ok=True)
    AutoModelForImageTextToText.register(_method.config_class, _method.generation_class, exist_ok=True)
    # A method whose model shortens the prompt itself uses the stock processor (registry: processor_class_name).
    AutoProcessor.register(_method.config_class, _method.processor_class, exist_ok=True)
del _method

# LLaVA-NeXT VisionZip is a family/method pair, not a registry method (yet): registered here, with the stock processor.
AutoConfig.register(LlavaNextVisionZipConfig.model_type, LlavaNextVisionZipConfig, exist_ok=True)  # noqa: F405
AutoModel.register(LlavaNextVisionZipConfig, LlavaNextVisionZipModel, exist_ok=True)  # noqa: F405
AutoModelForImageTextToText.register(LlavaNextVisionZipConfig, LlavaNextVisionZipForConditionalGeneration,  # noqa: F405
                                     exist_ok=True)
AutoProcessor.register(LlavaNextVisionZipConfig, LlavaNextProcessor, exist_ok=True)  # noqa: F405

__all__ = [*configuration.__all__, *modeling.__all__]
