"""What the token-reducing LLaVA models share: the inner models' mixin (placeholder counts,
compacting `forward`), the outer class with its checkpoint saving, the weight renames that let stock LLaVA
checkpoints load, and temporary module hooks for tools (input checks and the vision tower run live in
`vision_inputs.py`).

Shipped with every checkpoint (remote code): it imports only torch, transformers and sibling modules.
"""

import contextlib
import os

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, PretrainedConfig
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg

from .checkpoint_code import auto_map_entry, write_checkpoint_code
from .checkpoint_source import accepted_type_mismatch, checkpoint_config_dict, refuse_unfit_checkpoint
from .reduced_generation import ReducedGenerationMixin
from .vision_inputs import as_pixel_batch, run_vision_tower, vision_tokens_of  # noqa: F401 (re-exported)
from .reduced_inputs import ReducedInputsMixin


def register_llava_weight_renames(outer_class_name: str, inner_class_name: str) -> None:
    """Let our classes load stock llava-hf checkpoints (legacy `language_model.model.*` keys).

    transformers skips its own LLaVA renames for custom-code classes unless the class name is registered;
    without this the language model, LM head and projector would load randomly initialised. Registered by
    class name, not model type, because the inner model shares the model type and would be renamed twice.
    """
    register_checkpoint_conversion_mapping(outer_class_name, get_checkpoint_conversion_mapping("llava"), overwrite=True)
    register_checkpoint_conversion_mapping(
        inner_class_name, get_checkpoint_conversion_mapping("LlavaModel"), overwrite=True
    )


@contextlib.contextmanager
def capture_outputs_of(modules: dict[str, nn.Module]):
    """Record the forward output of each named module while the block runs; hooks are removed on exit,
    also when the forward raises. Yields the dict that fills up.

    Not for model code: the hooks see every forward of the modules, also other threads' (the benchmark
    uses it on a model it owns); models use `run_vision_tower`."""
    captured: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class ReducedLlavaModelMixin(ReducedInputsMixin):
    """Base of the inner models (`LlavaVisionZipModel`, `LlavaTrimModel`, before `LlavaModel`): they accept
    stock-processor prompts as stock `LlavaModel` does, compacting them around the reduced images (hidden
    states over the compact sequence), and say how many placeholders the processor gives each image."""

    def image_placeholder_counts(self, pixel_values, **side_inputs) -> list[int]:
        """Per image, the placeholders the stock LLaVA processor emits for it: the patch grid of its pixels
        plus the tower's extra (CLS) token, minus one for strategy `"default"` (`LlavaProcessor`'s
        `num_additional_image_tokens` is the tower's CLS). A family whose count depends on more than the
        pixels (LLaVA-NeXT's `image_sizes`) overrides this; the side inputs arrive as keyword arguments."""
        pixel_values = as_pixel_batch(pixel_values, self.config.vision_config)
        count = vision_tokens_of(pixel_values, self.config.vision_config)
        if self.config.vision_feature_select_strategy == "default":
            count -= 1
        return [count] * pixel_values.shape[0]

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        """Stock `LlavaModel.forward`, plus: given `pixel_values` and a prompt with full placeholder runs,
        the images are reduced and `input_ids`/`attention_mask` compacted, with contiguous positions; the
        returned hidden states are `[B, C, hidden]` over the compact sequence."""
        side_inputs = self._pop_side_inputs(kwargs)
        if pixel_values is not None and mm_encoder_outputs is None:
            compacted = self._compact_forward_inputs(
                input_ids, pixel_values, attention_mask, position_ids, cache, side_inputs
            )
            input_ids, attention_mask = compacted["input_ids"], compacted["attention_mask"]
            position_ids, mm_encoder_outputs = compacted["position_ids"], compacted["mm_encoder_outputs"]
        elif mm_encoder_outputs is None:
            self._refuse_placeholders_without_images(input_ids, cache)
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )


class ReducedLlavaForConditionalGeneration(ReducedGenerationMixin, LlavaForConditionalGeneration):
    """LLaVA whose inner model reduces each image's tokens; the base of the public model classes.

    Subclasses set `config_class` and `inner_model_class`. The inner model's `get_image_features`
    returns one `[k_i, text_hidden]` tensor per image; `ReducedGenerationMixin` makes `generate` and
    `forward` accept prompts expanded by the stock processor.
    """

    inner_model_class: type = None

    def __init__(self, config):
        # Not LlavaForConditionalGeneration.__init__: that would build (and initialise) a stock LlavaModel.
        LlavaPreTrainedModel.__init__(self, config)
        self.model = self.inner_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """As transformers', after refusing a checkpoint that does not fit this class, before any weight is
        built (a LLaVA-NeXT one, a stock one for TRIM: `checkpoint_source.py`)."""
        config_dict = None
        if pretrained_model_name_or_path is not None and not isinstance(kwargs.get("config"), PretrainedConfig):
            config_dict = checkpoint_config_dict(pretrained_model_name_or_path, kwargs)
            if config_dict is not None:
                refuse_unfit_checkpoint(cls, pretrained_model_name_or_path, config_dict)
        with accepted_type_mismatch((config_dict or {}).get("model_type"), cls.config_class.model_type):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Save weights and config, plus the code files that make the directory load with
        `AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)` anywhere."""
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": auto_map_entry(type(self.config)),
            "AutoModel": auto_map_entry(self.inner_model_class),
            "AutoModelForImageTextToText": auto_map_entry(type(self)),
        }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_checkpoint_code(save_directory, [type(self).__module__])
        return result
