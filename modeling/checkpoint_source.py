"""Which checkpoints a token-reducing LLaVA class may load, checked before any weight is built.

transformers loads any config into any config class (with a warning) and reports weights it could not place
only after initialising them randomly. So `ReducedCheckpointMixin.from_pretrained` first reads the checkpoint's
config.json and refuses what does not fit: a checkpoint of another family (the family's `other_family_refusal`:
a LLaVA-NeXT (anyres) checkpoint in a LLaVA-1.5 class), a stock checkpoint of the family in a method that needs
weights stock ones lack (the method's `stock_checkpoint_refusal`: TRIM's CLIP text tower), any other model type.
A stock checkpoint in a class that accepts it loads without transformers' "model of type llava to instantiate a
model of type ..." warning: that load is the documented use, not a mistake. The rules' texts live with the
family and the method, so this file is the same for every checkpoint.

Shipped with every checkpoint (remote code): it imports only transformers.
"""

import contextlib
import logging

from transformers import PretrainedConfig


# The keyword arguments of `from_pretrained` that say where the config file is.
_FILE_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


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
    """Raise `ValueError` when the checkpoint `config_dict` describes does not fit `cls` (see the module doc).

    `cls` is an outer class: its family says its stock `stock_model_type` and `other_family_refusal(config_dict)`,
    its inner model's method says `stock_checkpoint_refusal` (None when stock checkpoints load)."""
    own = cls.config_class.model_type
    stock_refusal = getattr(cls.inner_model_class, "stock_checkpoint_refusal", None)
    accepted = (own,) if stock_refusal else (own, cls.stock_model_type)
    model_type = config_dict.get("model_type")
    family_refusal = cls.other_family_refusal(config_dict)
    if family_refusal:
        raise ValueError(f"{source} is {family_refusal} (model_type {model_type!r}); {cls.__name__} loads "
                         f"{' or '.join(repr(t) for t in accepted)} checkpoints. {cls.family_hint}")
    if model_type in accepted:
        return
    if model_type == cls.stock_model_type and stock_refusal:
        raise ValueError(f"{source} is a stock {cls.family_label} checkpoint: {stock_refusal}")
    raise ValueError(f"{source} has model_type {model_type!r}; {cls.__name__} loads "
                     f"{' or '.join(repr(t) for t in accepted)} checkpoints")


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


__all__ = ["checkpoint_config_dict", "refuse_unfit_checkpoint", "accepted_type_mismatch"]
