"""What every family's token-reducing model shares: the inner models' compacting `forward` and the outer models'
checkpoint loading (refusing checkpoints that do not fit) and saving (with the code files remote code needs).

The family modules (`family_llava.py`) combine these with their stock transformers classes; the generation
mechanism itself is `reduced_generation.py`.

Shipped with every checkpoint (remote code): it imports only transformers and sibling modules.
"""

import os

from torch import nn
from transformers import PretrainedConfig
from transformers.utils.deprecation import deprecate_kwarg

from .checkpoint_code import auto_map_entry, write_checkpoint_code
from .checkpoint_source import accepted_type_mismatch, checkpoint_config_dict, refuse_unfit_checkpoint
from .reduced_inputs import ReducedInputsMixin


class ReducedLlavaModelMixin(ReducedInputsMixin):
    """Base of every family's inner model (before the stock inner class, `LlavaModel` for LLaVA-1.5): it accepts
    stock-processor prompts as the stock model does, compacting them around the reduced images (hidden states
    over the compact sequence). The family adds `image_placeholder_counts` and `get_image_features`."""

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
        # `image_sizes` is a named stock parameter: a family's per-image input must not be swallowed by it.
        side_inputs = self._pop_side_inputs(kwargs, image_sizes=image_sizes)
        image_sizes = kwargs.pop("image_sizes", None)
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



class ReducedCheckpointMixin:
    """Loading and saving of the outer (`...ForConditionalGeneration`) classes, whatever their family. The class
    sets `config_class` and `inner_model_class`."""

    inner_model_class: type = None

    def _build_outer(self, config, pretrained_class: type) -> None:
        """The outer model's modules: our inner model and the LM head. Not the stock outer `__init__`, which would
        build (and initialise) a stock inner model; `pretrained_class` is the family's `...PreTrainedModel`."""
        pretrained_class.__init__(self, config)
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


__all__ = ["ReducedCheckpointMixin", "ReducedLlavaModelMixin"]
