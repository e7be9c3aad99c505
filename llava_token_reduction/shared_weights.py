"""Several LLaVA model classes on one set of weights, for side-by-side comparisons (demo, bench)."""


def twin(model, model_class, **fields):
    """A `model_class` (stock `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` or one of this
    package's classes of the same family) that shares the vision tower, projector, language model and LM head
    (and LLaVA-NeXT's `image_newline`: so every weight) with `model`, another of them: a second model on the
    same weights at no extra memory. The config is `model`'s minus its
    reduction fields, plus `fields`."""
    import torch
    from transformers import LlavaConfig

    from .methods import METHODS

    stock_fields = set(LlavaConfig().to_dict())
    reduction_fields = {
        name for method in METHODS.values() for name in method.config_class().to_dict() if name not in stock_fields
    }
    values = {
        name: value for name, value in model.config.to_dict().items()
        if name not in reduction_fields
        and name not in ("model_type", "auto_map", "architectures", "transformers_version")
    }
    config = model_class.config_class(**values, **fields)
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        result = model_class(config)
    result.model.vision_tower = model.model.vision_tower
    result.model.multi_modal_projector = model.model.multi_modal_projector
    result.model.language_model = model.model.language_model
    if hasattr(model.model, "image_newline"):  # LLaVA-NeXT's one extra parameter
        result.model.image_newline = model.model.image_newline
    result.lm_head = model.lm_head
    result.generation_config = model.generation_config
    leftovers = [name for name, tensor in [*result.named_parameters(), *result.named_buffers()] if tensor.is_meta]
    if leftovers and not any(tensor.is_meta for tensor in model.parameters()):
        raise RuntimeError(
            f"{model_class.__name__} twin has modules that are not shared with the model: {leftovers[:3]}"
        )
    return result.eval()
