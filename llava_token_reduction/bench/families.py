"""The model families `bench` builds and loads: LLaVA-1.5 (one 336-px crop per image) and LLaVA-NeXT (anyres: a
base crop plus a grid of crops per image, the budget per crop).

The stock class of a family and the class of each reduction method it has are read off the registries
(`llava_token_reduction.families`, `llava_token_reduction.methods`); what is here is only what bench adds: the
rows it times by default on a family and the crops of its reference picture.
"""

from dataclasses import dataclass, field

from .. import families as family_registry
from .. import methods as registry
from ..methods import BenchVariant


@dataclass(frozen=True)
class BenchFamily:
    """One registered model family (`llava_token_reduction.families`) as bench sees it: the stock class and each
    method's class there come from the registries; bench adds the rows it times by default and the crops of its
    reference picture."""

    name: str  # a `families.FAMILIES` name, which is also its stock checkpoints' model type
    # registry method name -> the rows bench times by default (None: the registry's `bench_variants`)
    bench_variants: dict = field(default_factory=dict)
    # Crops per image on the family's reference picture (1 for LLaVA-1.5; a 2x2 grid for LLaVA-NeXT: 5), so that
    # a row named by its tokens per image ("visionzip-160") says what the language model sees on that picture.
    reference_crops: int = 1

    @property
    def registered(self):
        return family_registry.get_family(self.name)

    @property
    def label(self) -> str:
        return self.registered.label

    @property
    def stock_model_type(self) -> str:
        return self.name

    @property
    def stock_class(self):
        return self.registered.stock_generation_class

    @property
    def anyres(self) -> bool:
        """Images are cut into crops on a grid: configs carry `image_grid_pinpoints`, the processor is
        `LlavaNextProcessor`, `image_sizes` travels with the pixels."""
        return self.registered.crop_layouts_reference is not None

    @property
    def methods(self) -> tuple:
        """The registry entries with classes in this family, in the registry's order."""
        return registry.methods_of_family(self.name)

    def has(self, method) -> bool:
        return self.name in method.families

    def generation_class(self, method):
        """The class of `method` (a registry entry) in this family; `ValueError` naming those it has otherwise."""
        if not self.has(method):
            have = registry.labels_in_words([m.name for m in self.methods]) if self.methods else "none"
            raise ValueError(f"{method.label} has no {self.label} classes; {self.label} methods: {have}")
        return method.classes(self.name).generation_class

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


LLAVA = BenchFamily("llava")

LLAVA_NEXT = BenchFamily(
    "llava_next",
    # The published LLaVA-NeXT budgets, per crop: 108+20 / 54+10 / 27+5 = 640 / 320 / 160 on a 2x2-grid image.
    bench_variants={"visionzip": _per_crop_variants(((108, 20), (54, 10), (27, 5)), crops=5)},
    reference_crops=5,
)

FAMILIES = {family.name: family for family in (LLAVA, LLAVA_NEXT)}


def family_of_model_type(model_type: str):
    """`(family, method)` of a checkpoint's `model_type`: the method is None for a stock checkpoint; `ValueError`
    naming the model types bench loads otherwise."""
    found = registry.find_model_type(model_type)
    if found is not None:
        return FAMILIES[found[1].family], found[0]
    if model_type in FAMILIES:  # a family's name is its stock checkpoints' model type
        return FAMILIES[model_type], None
    known = [kind for f in FAMILIES.values()
             for kind in (f.stock_model_type, *(m.reduced_model_types[f.name] for m in f.methods))]
    raise ValueError(f"a {model_type!r} checkpoint; bench loads model types {', '.join(known)}")


def method_of(model):
    """The registry entry of `model`'s method (any family); None for a stock model."""
    return family_of_model_type(model.config.model_type)[1]


__all__ = ["BenchFamily", "budget_row_name", "FAMILIES", "LLAVA", "LLAVA_NEXT", "family_of_model_type", "method_of"]
