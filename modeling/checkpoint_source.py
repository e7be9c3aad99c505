"""Which checkpoints a token-reducing LLaVA class may load, checked before any weight is built.

transformers loads any config into any config class (with a warning) and reports weights it could not place
only after initialising them randomly. So `ReducedLlavaForConditionalGeneration.from_pretrained` first reads
the checkpoint's config.json and refuses what does not fit: a LLaVA-NeXT (anyres) checkpoint in a LLaVA-1.5
class, a stock LLaVA checkpoint (no CLIP text tower) in a TRIM class, any other model type. A stock `llava`
checkpoint in a class that accepts it loads without transformers' "model of type llava to instantiate a model
of type ..." warning: that load is the documented use, not a mistake.

Shipped with every checkpoint (remote code): it imports only transformers.
"""

import contextlib
import logging

from transformers import PretrainedConfig


# The keyword arguments of `from_pretrained` that say where the config file is.
_FILE_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# Checkpoint model types each class loads besides its own, by the class's model type.
ACCEPTED_SOURCE_TYPES = {"llava_visionzip": ("llava",)}
_NEXT_HINT = ("LLaVA-NeXT (anyres) checkpoints have their own classes and image grids; this class is for "
              "LLaVA-1.5-style checkpoints")


def checkpoint_config_dict(pretrained_model_name_or_path, kwargs: dict) -> dict | None:
    """The checkpoint's config.json as a dict, or None when it cannot be read here (transformers then reports
    the problem in its own words)."""
    file_kwargs = {name: kwargs[name] for name in _FILE_KWARGS if name in kwargs}
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **file_kwargs)
    except (OSError, ValueError):
        return None
    return config_dict


def refuse_unfit_checkpoint(cls, source, config_dict: dict) -> None:
    """Raise `ValueError` when the checkpoint `config_dict` describes does not fit `cls` (see the module doc)."""
    own = cls.config_class.model_type
    accepted = (own, *ACCEPTED_SOURCE_TYPES.get(own, ()))
    model_type = config_dict.get("model_type")
    if model_type == "llava_next" or "image_grid_pinpoints" in config_dict:
        raise ValueError(f"{source} is a LLaVA-NeXT checkpoint (model_type {model_type!r}); {cls.__name__} loads "
                         f"{' or '.join(repr(t) for t in accepted)} checkpoints. {_NEXT_HINT}")
    if model_type in accepted:
        return
    if model_type == "llava" and own == "llava_trim":
        raise ValueError(
            f"{source} is a stock LLaVA checkpoint: it has no CLIP text tower, which TRIM needs (its weights would be "
            "initialised randomly). Convert it first: `llava-token-reduction convert trim SRC OUT --clip "
            "openai/clip-vit-large-patch14-336` (the CLIP of its vision tower), then load OUT"
        )
    raise ValueError(f"{source} has model_type {model_type!r}; {cls.__name__} loads "
                     f"{' or '.join(repr(t) for t in accepted)} checkpoints")


def refuse_language_tokenizer_as_clip(tokenizer, clip_tokenizer) -> None:
    """Raise `ValueError` when TRIM's CLIP tokenizer is the language model's tokenizer.

    That is what loading gives when a TRIM checkpoint lost its `clip_tokenizer/` subfolder (top-level files
    copied, a mirror without subfolders): transformers falls back to the root tokenizer with only a log line,
    and TRIM would then score patches against token ids from the wrong vocabulary."""
    if tokenizer is None or clip_tokenizer is None:
        return
    if clip_tokenizer is tokenizer or clip_tokenizer.get_vocab() == tokenizer.get_vocab():
        raise ValueError(
            "TRIM's CLIP tokenizer is the language model's tokenizer: the checkpoint's `clip_tokenizer/` subfolder "
            "is missing (copy it along with the top-level files, or re-run `convert trim`); the CLIP text tower "
            "cannot read the language model's token ids"
        )


class _DropTypeMismatchWarning(logging.Filter):
    def __init__(self, source_type: str, target_type: str):
        super().__init__()
        self.text = f"model of type `{source_type}` to instantiate a model of type `{target_type}`"

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def accepted_type_mismatch(source_type: str | None, target_type: str):
    """While the block runs, transformers' config-type warning for exactly this accepted pair is dropped."""
    if source_type in (None, target_type):
        yield
        return
    logger = logging.getLogger("transformers.configuration_utils")
    dropper = _DropTypeMismatchWarning(source_type, target_type)
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


__all__ = [
    "ACCEPTED_SOURCE_TYPES", "checkpoint_config_dict", "refuse_unfit_checkpoint", "accepted_type_mismatch",
    "refuse_language_tokenizer_as_clip",
]
