"""VisionZip and TRIM visual-token reduction for LLaVA, as Hugging Face Transformers models.

Importing this package registers every method of the registry (`llava_token_reduction.methods.METHODS`), in every
model family it has classes for, with transformers' Auto classes, so `AutoModelForImageTextToText.from_pretrained(...)`
resolves them without remote code. The public classes are those the `configuration` and `modeling` packages export;
a new method (or a method's classes in another family) adds its classes there and its entry to the registry, and
needs no edit here.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from . import configuration, modeling
from .configuration import *  # noqa: F403 - the config classes, listed in configuration.__all__
from .methods import all_classes
from .modeling import *  # noqa: F403 - the model and processor classes, listed in modeling.__all__


__version__ = "0.1.0"

# Every method's classes in every family it supports (LLaVA-1.5, LLaVA-NeXT): the registry's `FamilyClasses`.
for _classes in all_classes():
    AutoConfig.register(_classes.model_type, _classes.config_class, exist_ok=True)
    AutoModel.register(_classes.config_class, _classes.model_class, exist_ok=True)
    AutoModelForImageTextToText.register(_classes.config_class, _classes.generation_class, exist_ok=True)
    # A method whose model shortens the prompt itself uses the stock processor (registry: processor_class_name).
    AutoProcessor.register(_classes.config_class, _classes.processor_class, exist_ok=True)
del _classes

__all__ = [*configuration.__all__, *modeling.__all__]
