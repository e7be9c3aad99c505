"""The model families `bench` builds and loads: LLaVA-1.5 (one 336-px crop per image) and LLaVA-NeXT (anyres: a
base crop plus a grid of crops per image, the budget per crop).

The stock class of a family and the class of each reduction method it has are read off the registries
(`llava_token_reduction.families`, `llava_token_reduction.methods`); what is here is only what bench adds: the
rows it times by default on a family and the crops of its reference picture.
"""

from dataclasses import dataclass, field

from .. import families as family_registry
from .. import methods as registry
from ..methods import BenchVariant, _resolve


@dataclass(frozen=True)
class BenchFamily:
    """One model family: its stock classes, the generation class of every method it has (by registry name, with
    its config's `model_type`), and the rows bench times by default."""

    name: str
    label: str
    stock_model_type: str
    stock_class_name: str
    # registry method name -> (generation class reference, model_type of its config)
    method_classes: dict = field(default_factory=dict)
    # registry method name -> the rows bench times by default (None: the registry's `bench_variants`)
    bench_variants: dict = field(default_factory=dict)
    # Images are cut into crops on a grid (anyres): configs carry `image_grid_pinpoints`, the processor is
    # `LlavaNextProcessor`, `image_sizes` travels with the pixels.
    anyres: bool = False
    # Crops per image on the family's reference picture (1 for LLaVA-1.5; a 2x2 grid for LLaVA-NeXT: 5), so that
    # a row named by its tokens per image ("visionzip-160") says what the language model sees on that picture.
    reference_crops: int = 1

    @property
    def stock_class(self):
        return _resolve(self.stock_class_name)

    def generation_class(self, method):
        """The class of `method` (a registry entry) in this family; `ValueError` naming those it has otherwise."""
        if method.name not in self.method_classes:
            have = registry.labels_in_words(list(self.method_classes)) if self.method_classes else "none"
            raise ValueError(f"{method.label} has no {self.label} classes; {self.label} methods: {have}")
        return _resolve(self.method_classes[method.name][0])

    def method_of_model_type(self, model_type: str):
        """The registry entry whose config in this family has `model_type`, or None."""
        for name, (_, own_type) in self.method_classes.items():
            if own_type == model_type:
                return registry.get(name)
        return None

    def variants(self, method) -> tuple[BenchVariant, ...]:
        given = self.bench_variants.get(method.name)
        return method.bench_variants if given is None else given


def budget_row_name(method_name: str, tokens_per_crop: int, crops: int = 1) -> str:
    """A fixed-budget row's name: the method and its tokens per image on a `crops`-crop picture ("visionzip-160")."""
    return f"{method_name}-{crops * tokens_per_crop}"


def _per_crop_variants(budgets, crops: int) -> tuple[BenchVariant, ...]:
    """VisionZip rows of per-crop `(dominant, contextual)` budgets, named by the tokens of a `crops`-crop image."""
    return tuple(
        BenchVariant(budget_row_name("visionzip", dominant + contextual, crops),
                     (("dominant_tokens", dominant), ("contextual_tokens", contextual)))
        for dominant, contextual in budgets
    )


def _from_registry(name: str, **bench_fields) -> BenchFamily:
    """The bench view of the registered family `name`: its stock class and every method's class there."""
    family = family_registry.get_family(name)
    return BenchFamily(
        name=name,
        label=family.label,
        stock_model_type=name,  # a family's name is its stock checkpoints' model type
        stock_class_name=family.stock_generation_class_name,
        method_classes={method.name: (method.classes(name).generation_class_name, method.classes(name).model_type)
                        for method in registry.methods_of_family(name)},
        **bench_fields,
    )


LLAVA = _from_registry("llava")

LLAVA_NEXT = _from_registry(
    "llava_next",
    # The published LLaVA-NeXT budgets, per crop: 108+20 / 54+10 / 27+5 = 640 / 320 / 160 on a 2x2-grid image.
    bench_variants={"visionzip": _per_crop_variants(((108, 20), (54, 10), (27, 5)), crops=5)},
    anyres=True,
    reference_crops=5,
)

FAMILIES = {family.name: family for family in (LLAVA, LLAVA_NEXT)}


def family_of_model_type(model_type: str):
    """`(family, method)` of a checkpoint's `model_type`: the method is None for a stock checkpoint; `ValueError`
    naming the model types bench loads otherwise."""
    for family in FAMILIES.values():
        if model_type == family.stock_model_type:
            return family, None
        method = family.method_of_model_type(model_type)
        if method is not None:
            return family, method
    known = [t for f in FAMILIES.values() for t in (f.stock_model_type, *(m[1] for m in f.method_classes.values()))]
    raise ValueError(f"a {model_type!r} checkpoint; bench loads model types {', '.join(known)}")


def method_of(model):
    """The registry entry of `model`'s method (any family); None for a stock model."""
    return family_of_model_type(model.config.model_type)[1]


__all__ = ["BenchFamily", "budget_row_name", "FAMILIES", "LLAVA", "LLAVA_NEXT", "family_of_model_type", "method_of"]
