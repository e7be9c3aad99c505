"""What the evaluation and serving tools need to know about each reduction method, in one table.

Nothing else in `llava_token_reduction.evaluation` or `llava_token_reduction.serve` names a method or a
model type: they ask this module. A method registry can replace the table without touching its users.

- which `model_type`s are a method's reduced models (a checkpoint of that type *is* that method);
- how a stock checkpoint becomes one at load time (`method=visionzip` on a stock LLaVA checkpoint loads it
  into the reduced class, with the budget as config overrides); TRIM has no such path, because it needs
  CLIP's text tower, which only `convert trim` adds;
- whether the method scores the question text (TRIM: the processor takes it as `clip_text=`).
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReductionMethod:
    """One reduction method as the tools see it.

    Attributes:
        name: the method's name in `method=` and in the lmms-eval model name `llava_<name>`.
        reduced_model_types: stock model type -> the reduced model type of this method for that family.
        from_stock: whether a stock checkpoint can be loaded into the reduced class as it is (no new weights).
        scores_question: whether the processor takes each image's question (`clip_text=`).
        how_to_make: what to tell a user whose stock checkpoint cannot be loaded as this method.
    """

    name: str
    reduced_model_types: dict[str, str] = field(default_factory=dict)
    from_stock: bool = True
    scores_question: bool = False
    how_to_make: str = ""


METHODS: tuple[ReductionMethod, ...] = (
    ReductionMethod(
        name="visionzip",
        reduced_model_types={"llava": "llava_visionzip", "llava_next": "llava_next_visionzip"},
    ),
    ReductionMethod(
        name="trim",
        reduced_model_types={"llava": "llava_trim"},
        from_stock=False,
        scores_question=True,
        how_to_make="TRIM needs CLIP's text tower: make a TRIM checkpoint with "
        "`llava-token-reduction convert trim SRC OUT --clip CLIP_SRC` and evaluate OUT",
    ),
)

# Stock transformers families whose checkpoints evaluate unreduced (the baseline) through the same code.
STOCK_MODEL_TYPES: tuple[str, ...] = ("llava", "llava_next")


def method_names() -> list[str]:
    return [method.name for method in METHODS]


def get_method(name: str) -> ReductionMethod:
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(f"unknown reduction method {name!r}; known methods: {', '.join(method_names())}")


def method_of_model_type(model_type: str) -> ReductionMethod | None:
    """The method whose reduced models have `model_type`, or None for a stock (or unknown) type."""
    for method in METHODS:
        if model_type in method.reduced_model_types.values():
            return method
    return None


def reduced_model_types() -> list[str]:
    return [model_type for method in METHODS for model_type in method.reduced_model_types.values()]


def stock_to_reduced(method: ReductionMethod, stock_model_type: str) -> str:
    """The reduced model type that loads a stock `stock_model_type` checkpoint as `method`.

    Raises `ValueError` saying what is possible instead when it cannot be done at load time."""
    if not method.from_stock:
        raise ValueError(f"a stock {stock_model_type!r} checkpoint cannot be loaded as {method.name} at load time: {method.how_to_make}")
    if stock_model_type not in method.reduced_model_types:
        raise ValueError(
            f"{method.name} has no model class for {stock_model_type!r} checkpoints; it supports "
            f"{', '.join(sorted(method.reduced_model_types))}"
        )
    return method.reduced_model_types[stock_model_type]
