"""Value checks shared by the token-reduction configs.

Shipped with every checkpoint (remote code), so it imports nothing but the standard library.
Each check raises ``ValueError`` naming the field, the value and what is allowed, because a config
error found only deep inside a forward pass is hard to trace back to the field that caused it.
"""

import math
import numbers


def check_int(field: str, value, minimum: int | None = None, maximum: int | None = None) -> None:
    """Reject non-integers (``bool`` included) and integers outside ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        # Name the allowed range here too: the contract wants field, value and range in every message.
        bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
        allowed = " and ".join(bound for bound in bounds if bound)
        raise ValueError(
            f"`{field}` must be an int{' ' + allowed if allowed else ''} (not a bool or float), "
            f"got {value!r} ({type(value).__name__})"
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"`{field}` must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{field}` must be <= {maximum}, got {value}")


def check_optional_int(field: str, value, minimum: int | None = None) -> None:
    if value is not None:
        check_int(field, value, minimum=minimum)


def check_count_bounds(min_field: str, low, max_field: str, high, available: int) -> None:
    """Optional bounds on a per-image count (already checked one by one): `low <= high`, both `<= available`."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"`{min_field}` must be <= `{max_field}`={high}, got {low}")
    for field, value in ((min_field, low), (max_field, high)):
        if value is not None and value > available:
            raise ValueError(f"`{field}` must be <= {available} (the patches per image), got {value}")


def check_count_fits(prefix: str, low, high, available: int, extra: int, image_seq_length: int,
                     unbounded: bool = False, also: str = "") -> None:
    """The bounds `<prefix>_min_tokens` = `low` / `<prefix>_max_tokens` = `high` of a per-image count that varies
    (TRIM's, PruMerge's; each already checked alone) against the `available` patches, and the most tokens an
    image can then yield against its `image_seq_length` placeholders: all the patches when `high` is None or the
    method adds tokens the bound does not cover (`unbounded`), else `high` plus the `extra` tokens the method
    appends (a mean or a sum of the rest). `also` completes the advice of the message."""
    max_field = f"{prefix}_max_tokens"
    check_count_bounds(f"{prefix}_min_tokens", low, max_field, high, available)
    most = available if high is None or unbounded else min(available, high + extra)
    if most > image_seq_length:
        raise ValueError(
            f"`{max_field}` must leave room for the image placeholders: an image may yield {most} tokens but "
            f"image_seq_length={image_seq_length}; set `{max_field}` <= {image_seq_length - extra}{also}, got {high}"
        )


def check_bool(field: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{field}` must be a bool (True or False), got {value!r} ({type(value).__name__})")


def check_finite_float(field: str, value, minimum: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{field}` must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{field}` must be >= {minimum}, got {value}")


def check_layer_index(field: str, value, num_layers: int) -> None:
    """A layer index as Python indexes ``encoder.layers``: ``-num_layers .. num_layers - 1``."""
    check_int(field, value)
    if not -num_layers <= value < num_layers:
        raise ValueError(
            f"`{field}` must index one of the vision tower's {num_layers} layers "
            f"(from {-num_layers} to {num_layers - 1}), got {value}"
        )


def check_single_feature_layer(value, method: str) -> None:
    """`vision_feature_layer` must be one layer index: `LlavaConfig` also allows a list, for which the projector is
    built on the concatenation of several layers, and the reductions feed it one layer's features."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"`vision_feature_layer` must be one int (a hidden-state index of the vision tower, default -2) for "
            f"{method}, got {value!r}: a list of layers builds a projector for concatenated features, and {method} "
            "feeds it the tokens of one layer"
        )


def plain_scalar(value):
    """numpy scalars and 0-d numpy arrays / torch tensors as the Python number they hold (so the config stays
    JSON-serialisable); anything else unchanged. Duck-typed: this module imports neither numpy nor torch."""
    if not isinstance(value, (bool, int, float, str)) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def vision_token_count(vision_config) -> int:
    """Tokens the vision tower emits per image: the patch grid plus CLS."""
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


class FieldCheckedConfig:
    """Mixin for configs whose fields are checked one at a time whenever they are set (numpy and torch scalars
    are stored as the plain Python number they hold).

    `from_pretrained(path, field=value)` applies load-time overrides with setattr after construction,
    bypassing `__post_init__`; checking in `__setattr__` catches those too. Subclasses list their checks
    in `single_field_checks` (field name -> callable raising `ValueError`) and define their full validation,
    `validate_token_reduction()`, which calls `check_fields()`; it runs once the family's config is built.
    """

    single_field_checks: dict = {}

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_token_reduction()

    def __setattr__(self, key, value):
        if key == "model_type":
            # Loading a stock checkpoint (`model_type: "llava"`) into our class would otherwise shadow the class's
            # own type on the instance, and everything that asks `config.model_type` would see "llava".
            return
        check = type(self).single_field_checks.get(key)
        if check is not None:
            value = plain_scalar(value)  # np.int64(10) is stored as 10: JSON cannot hold numpy numbers
            check(value)
        super().__setattr__(key, value)

    def check_fields(self) -> None:
        for field, check in type(self).single_field_checks.items():
            check(getattr(self, field))
