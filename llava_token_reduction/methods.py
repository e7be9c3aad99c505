"""The registry of reduction methods: what the tools (demo, bench, show, convert, tune, model cards, the Auto
registrations) ask about a method instead of branching on `"visionzip"` / `"trim"` / `model_type`.

A method is one `ReductionMethod` entry in `METHODS`. It names its classes (imported only when asked for, so
reading the registry costs nothing), the per-image inputs its model takes besides the pixels, whether it needs
CLIP's text tower, the config fields a user may override at load time or on a command line, the fields its
model-card template fills, what `show` draws, which converter builds its checkpoints and the rows `bench`
times. `docs/adding_a_method.md` is the checklist for adding one, and lists the tool branches still to be
converted to this registry.

Methods know nothing about model families, and families (`families.py`) nothing about methods; an entry is where
they meet: its class names (`model_type`, `config_class_name`, ...) are those of the LLaVA-1.5 family, which every
method supports, and `other_families` lists its classes in the other families (VisionZip on LLaVA-NeXT). A tool
asks `method.classes(family_name)` (refused with a `ValueError` naming the methods the family has) or
`find_model_type(model_type)` for any family's checkpoint.

Why one file of ~400 lines: the entry's fields and the three entries are read together (a contributor adding a
method copies an entry and fills each field next to its comment), and the lookups below are a few lines each.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import Any, Callable


def _resolve(reference: str):
    """`"module:name"` -> the object; a bare name is looked up in `llava_token_reduction`."""
    module, _, name = reference.rpartition(":")
    return getattr(importlib.import_module(module or "llava_token_reduction"), name)


def resolved(field_name: str) -> property:
    """A read-only attribute that is the object the entry's `field_name` ("module:name") names (`_resolve`)."""
    return property(lambda entry: _resolve(getattr(entry, field_name)),
                    doc=f"The object `{field_name}` names, imported when first asked for.")


@dataclass(frozen=True)
class Option:
    """A config field of a method that can be overridden at load time (`from_pretrained(path, field=value)`)
    and, when `cli` is true, is offered as `--field-name` by the tools that take the method's settings."""

    field: str
    type: type  # int, float or bool (None is allowed too when `optional`)
    default: Any  # the config class's default, for help texts
    help: str
    optional: bool = False
    cli: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    def add_to(self, parser: argparse.ArgumentParser, help: str | None = None, type: Callable | None = None) -> None:
        """Add this option to `parser`. Its argparse default is None, meaning "the checkpoint's value"; a bool
        option becomes `--flag` / `--no-flag`. `type` replaces the parsing of a non-bool value (e.g. a check
        that the integer is not negative)."""
        fallback = "unset" if self.default is None else self.default
        text = help or f"{self.help} (default: the checkpoint's, else {fallback})"
        if self.type is bool:
            parser.add_argument(self.flag, dest=self.field, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            parser.add_argument(self.flag, dest=self.field, type=type or self.type, default=None, metavar="N",
                                help=text)


@dataclass(frozen=True)
class BenchVariant:
    """One row `bench` times by default: a name and the config overrides that make it."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class FamilyClasses:
    """A method's classes in one model family (`families.FAMILIES`), and the model card of its checkpoints there."""

    family: str  # a `families.FAMILIES` name: "llava", "llava_next"
    model_type: str
    config_class_name: str  # resolved by `_resolve`
    model_class_name: str  # the inner model (`AutoModel`)
    generation_class_name: str  # the outer model (`AutoModelForImageTextToText`)
    processor_class_name: str  # what `AutoProcessor` resolves to for this config
    card_template: str  # file name in model_cards/
    card_fields: tuple[str, ...]  # the template's own placeholders (besides COMMON_CARD_FIELDS)
    card_fields_reference: str  # "module:name" of (config, CardContext) -> those fields plus title and intro

    config_class = resolved("config_class_name")
    model_class = resolved("model_class_name")
    generation_class = resolved("generation_class_name")
    processor_class = resolved("processor_class_name")
    card_fields_function = resolved("card_fields_reference")

    @property
    def model_family(self):
        from .families import get_family

        return get_family(self.family)


def _llava_classes_attribute(name: str) -> property:
    """A read-only attribute of `ReductionMethod` that is the same one of its LLaVA-1.5 `FamilyClasses`."""
    return property(lambda method: getattr(method.families["llava"], name),
                    doc=f"The LLaVA-1.5 family's `{name}` (`FamilyClasses.{name}`).")


@dataclass(frozen=True)
class ReductionMethod:
    """Everything the tools need to know about one reduction method (see the module docstring)."""

    name: str  # the command-line spelling: `convert NAME`, `show --method NAME`
    label: str  # how people write it: "VisionZip"
    model_type: str
    config_class_name: str  # resolved by `_resolve`: a name in llava_token_reduction, or "module:name"
    model_class_name: str  # the inner model (`AutoModel`)
    generation_class_name: str  # the outer model (`AutoModelForImageTextToText`)
    processor_class_name: str  # what `AutoProcessor` resolves to for this config
    summary: str  # one line: what a result of the method is
    reduction_steps: str  # what runs between the vision tower and the projector (bench's "reduction")
    side_inputs: tuple[str, ...]  # per-image inputs besides the pixels (the model's `image_side_input_names`)
    needs_clip_text_tower: bool  # the checkpoint carries CLIP's text tower (`convert` adds it from `--clip`)
    options: tuple[Option, ...]
    describe: Callable  # config -> the label with the config's settings ("VisionZip 54+10")
    describe_result: Callable  # (config, get_image_features output) -> what the first image's tokens are made of
    card_template: str  # file name in model_cards/
    card_fields: tuple[str, ...]  # the template's own placeholders (besides COMMON_CARD_FIELDS)
    card_fields_reference: str  # "module:name" of (config, CardContext) -> those fields plus title and intro
    convert_help: str  # the one-line help of `convert NAME`
    show_picture: str  # what `show` draws over the image
    show_selection: str  # the `show` function that computes one image's selection
    convert_function: str  # the converter entry that builds this method's checkpoints
    captures_vision_attention: bool  # reads a vision layer's attention (bench compares the released eager way)
    bench_variants: tuple[BenchVariant, ...]
    # "module:name" of the method's conversion step, `(conversion.method_conversion.MethodConversionInputs) ->
    # MethodConversion`: config fields and notes only it knows (TRIM: CLIP's text config, the original format's
    # `mm_vision_token_reduce_func`); None when the method needs none.
    conversion_hook: str | None = None
    # The method's classes in the families other than LLaVA-1.5 (whose classes are the fields above).
    other_families: tuple[FamilyClasses, ...] = ()
    # The keyword of the method's processor that takes each image's question (TRIM: `clip_text`), for the tools
    # that build its inputs from a chat (the evaluation plugin); None when the method scores no text.
    question_argument: str | None = None

    @property
    def reduced_model_types(self) -> dict[str, str]:
        """Stock model type -> this method's reduced model type, for every family it has classes for (a family's
        name is its stock checkpoints' model type)."""
        return {family: classes.model_type for family, classes in self.families.items()}

    @property
    def families(self) -> dict[str, FamilyClasses]:
        """Family name -> the method's classes there, LLaVA-1.5 first."""
        llava = FamilyClasses(
            family="llava", model_type=self.model_type, config_class_name=self.config_class_name,
            model_class_name=self.model_class_name, generation_class_name=self.generation_class_name,
            processor_class_name=self.processor_class_name, card_template=self.card_template,
            card_fields=self.card_fields, card_fields_reference=self.card_fields_reference,
        )
        return {"llava": llava, **{classes.family: classes for classes in self.other_families}}

    def classes(self, family: str) -> FamilyClasses:
        """The method's classes in `family` (a `families.FAMILIES` name); a `ValueError` naming the methods that
        family has when this one has none there."""
        from .families import get_family

        label = get_family(family).label
        try:
            return self.families[family]
        except KeyError:
            others = [method.label for method in methods_of_family(family)]
            offer = f"{label} checkpoints take {' or '.join(others)}" if others else f"no method supports {label}"
            raise ValueError(
                f"{self.label} has no {label} classes ({self.label} supports "
                f"{', '.join(get_family(name).label for name in self.families)}); {offer}"
            ) from None

    # The LLaVA-1.5 family's classes (`classes(name)` gives another family's).
    config_class = _llava_classes_attribute("config_class")
    model_class = _llava_classes_attribute("model_class")
    generation_class = _llava_classes_attribute("generation_class")
    processor_class = _llava_classes_attribute("processor_class")
    card_fields_function = _llava_classes_attribute("card_fields_function")

    @property
    def show_selection_function(self) -> Callable:
        """(model, pixel_values of one image, **the family's and the method's side inputs) -> `show.Selection`."""
        return _resolve(self.show_selection)

    @property
    def conversion_hook_function(self) -> Callable | None:
        return _resolve(self.conversion_hook) if self.conversion_hook else None

    def cli_options(self) -> tuple[Option, ...]:
        return tuple(option for option in self.options if option.cli)

    def overrides_from(self, args: argparse.Namespace) -> dict:
        """The load-time overrides the user gave on the command line (options left at None are not set)."""
        values = {option.field: getattr(args, option.field, None) for option in self.cli_options()}
        return {field: value for field, value in values.items() if value is not None}


# Placeholders every card template has; `conversion/model_card.py` fills them for every method.
COMMON_CARD_FIELDS = ("license", "base_model_yaml", "repo_id", "image_url", "image_seq_length", "conversion_notes",
                      "title", "intro")


def _visionzip_result(config, output) -> str:
    return f"{config.dominant_tokens} dominant + {config.contextual_tokens} merged"


def _trim_result(config, output) -> str:
    kept = len(output.kept_indices[0])
    extra = len(output.pooler_output[0]) - kept
    return f"{kept} kept" + (f" + {extra} mean" if extra else "")


VISIONZIP = ReductionMethod(
    name="visionzip",
    label="VisionZip",
    model_type="llava_visionzip",
    config_class_name="LlavaVisionZipConfig",
    model_class_name="LlavaVisionZipModel",
    generation_class_name="LlavaVisionZipForConditionalGeneration",
    processor_class_name="transformers:LlavaProcessor",
    summary="a fixed budget per image: the patches CLS attends to most (CLS included), plus merged summaries of "
            "the rest",
    reduction_steps="CLS row, selection, merge",
    side_inputs=(),
    needs_clip_text_tower=False,
    options=(
        Option("dominant_tokens", int, 54, "VisionZip dominant tokens, CLS included", cli=True),
        Option("contextual_tokens", int, 10, "VisionZip merged tokens", cli=True),
        Option("visionzip_layer", int, -2, "the vision layer whose attention, keys and output are used"),
    ),
    describe=lambda config: f"VisionZip {config.dominant_tokens}+{config.contextual_tokens}",
    describe_result=_visionzip_result,
    card_template="visionzip.md",
    card_fields=("weights_note", "visionzip_layer", "dominant_tokens", "contextual_tokens", "tokens_per_image",
                 "budget_note"),
    card_fields_reference="llava_token_reduction.conversion.method_cards:visionzip_card_fields",
    convert_help="VisionZip (fixed budget, text-agnostic)",
    show_picture="dominant patches outlined, each merged group tinted, a dot on each group's target",
    show_selection="llava_token_reduction.show:visionzip_selection",
    convert_function="llava_token_reduction.conversion:convert_visionzip",
    captures_vision_attention=True,
    bench_variants=(
        BenchVariant("visionzip-192", (("dominant_tokens", 162), ("contextual_tokens", 30))),
        BenchVariant("visionzip-128", (("dominant_tokens", 108), ("contextual_tokens", 20))),
        BenchVariant("visionzip-64", (("dominant_tokens", 54), ("contextual_tokens", 10))),
    ),
    other_families=(
        # The budget is per 336-px crop (docs/llava_next.md); the stock processor, whose counts the model derives.
        FamilyClasses(
            family="llava_next",
            model_type="llava_next_visionzip",
            config_class_name="LlavaNextVisionZipConfig",
            model_class_name="LlavaNextVisionZipModel",
            generation_class_name="LlavaNextVisionZipForConditionalGeneration",
            processor_class_name="transformers:LlavaNextProcessor",
            card_template="llava_next_visionzip.md",
            card_fields=("visionzip_layer", "dominant_tokens", "contextual_tokens", "tokens_per_crop",
                         "grid_totals", "budget_note"),
            card_fields_reference="llava_token_reduction.conversion.method_cards:llava_next_visionzip_card_fields",
        ),
    ),
)

TRIM = ReductionMethod(
    name="trim",
    label="TRIM",
    model_type="llava_trim",
    config_class_name="LlavaTrimConfig",
    model_class_name="LlavaTrimModel",
    generation_class_name="LlavaTrimForConditionalGeneration",
    processor_class_name="LlavaTrimProcessor",
    summary="a count that varies per image: the patches CLIP scores as outliers against the question, plus their mean",
    reduction_steps="CLIP text tower, patch embeddings, scoring, IQR count, selection",
    side_inputs=("clip_input_ids", "clip_attention_mask"),
    needs_clip_text_tower=True,
    options=(
        Option("trim_negate_similarity", bool, True, "score by the softmax of the negated similarity (released code)"),
        Option("trim_iqr_multiplier", float, 1.5, "keep patches scoring above Q3 + m·IQR"),
        Option("trim_batch_coupled", bool, False, "pool the quartiles over the batch (released code)"),
        Option("trim_min_tokens", int, None, "at least this many kept patches", optional=True),
        Option("trim_max_tokens", int, None, "at most this many kept patches", optional=True),
        Option("trim_append_mean_token", bool, True, "append the mean of the unselected patches"),
    ),
    describe=lambda config: "TRIM",
    describe_result=_trim_result,
    card_template="trim.md",
    card_fields=("training_warning", "iqr_multiplier", "mean_token", "score_sign", "coupling", "budget_description"),
    card_fields_reference="llava_token_reduction.conversion.method_cards:trim_card_fields",
    convert_help="TRIM (question-aware, adaptive count)",
    show_picture="heat map of the log scores, kept outliers outlined",
    show_selection="llava_token_reduction.show:trim_selection",
    convert_function="llava_token_reduction.conversion:convert_trim",
    captures_vision_attention=False,
    bench_variants=(BenchVariant("trim"),),
    conversion_hook="llava_token_reduction.conversion.method_conversion:trim_conversion",
    question_argument="clip_text",
)

def _prumerge_result(config, output) -> str:
    merged, outliers = len(output.kept_indices[0]), output.outlier_counts[0]
    extra = len(output.pooler_output[0]) - merged
    sampled = f" ({outliers} outliers + {merged - outliers} sampled)" if config.prumerge_plus else ""
    return f"{merged} merged{sampled}" + (f" + {extra} extra" if extra else "")


PRUMERGE = ReductionMethod(
    name="prumerge",
    label="PruMerge",
    model_type="llava_prumerge",
    config_class_name="LlavaPruMergeConfig",
    model_class_name="LlavaPruMergeModel",
    generation_class_name="LlavaPruMergeForConditionalGeneration",
    processor_class_name="transformers:LlavaProcessor",
    summary="a count that varies per image: the patches the last layer's CLS attends to as outliers, each merged "
            "with its most similar patches, plus one weighted sum of the rest",
    reduction_steps="last layer's CLS row, IQR count, selection, merge",
    side_inputs=(),
    needs_clip_text_tower=False,
    options=(
        Option("prumerge_plus", bool, False, "PruMerge+: also keep an evenly spaced sample of the grid", cli=True),
        Option("prumerge_iqr_multiplier", float, 1.5, "keep patches whose CLS attention is above Q3 + m·IQR"),
        Option("prumerge_batch_coupled", bool, False, "pool the quartiles over the batch (released code)"),
        Option("prumerge_min_tokens", int, None, "at least this many outliers kept", optional=True),
        Option("prumerge_max_tokens", int, None, "at most this many outliers kept", optional=True),
    ),
    describe=lambda config: "PruMerge+" if config.prumerge_plus else "PruMerge",
    describe_result=_prumerge_result,
    card_template="prumerge.md",
    card_fields=("variant", "variant_description", "iqr_multiplier", "coupling", "budget_description"),
    card_fields_reference="llava_token_reduction.conversion.method_cards:prumerge_card_fields",
    convert_help="PruMerge / PruMerge+ (adaptive count, text-agnostic)",
    show_picture="heat map of the log CLS attention, kept patches outlined, PruMerge+'s samples dotted",
    show_selection="llava_token_reduction.show:prumerge_selection",
    convert_function="llava_token_reduction.conversion:convert_prumerge",
    captures_vision_attention=False,
    bench_variants=(BenchVariant("prumerge"), BenchVariant("prumerge-plus", (("prumerge_plus", True),))),
)

# In the order the tools list them.
METHODS: dict[str, ReductionMethod] = {method.name: method for method in (VISIONZIP, TRIM, PRUMERGE)}


def get(name: str) -> ReductionMethod:
    """The method called `name`; `ValueError` naming the choices otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reduction method {name!r}; choose from {', '.join(METHODS)}") from None


def for_model_type(model_type: str) -> ReductionMethod | None:
    """The method whose LLaVA-1.5 config has `model_type`, or None (a stock LLaVA, another family's checkpoint,
    or not ours). `find_model_type` answers for every family."""
    return next((method for method in METHODS.values() if method.model_type == model_type), None)


def find_model_type(model_type: str) -> tuple[ReductionMethod, FamilyClasses] | None:
    """`(method, its classes)` whose config has `model_type` in any family, or None (stock, or not ours)."""
    for method in METHODS.values():
        for classes in method.families.values():
            if classes.model_type == model_type:
                return method, classes
    return None


def all_classes() -> list[FamilyClasses]:
    """Every method's classes in every family (what `import llava_token_reduction` registers)."""
    return [classes for method in METHODS.values() for classes in method.families.values()]


def methods_of_family(family: str) -> tuple[ReductionMethod, ...]:
    """The methods that have classes in `family`, in the registry's order."""
    return tuple(method for method in METHODS.values() if family in method.families)



def for_reduced_model_type(model_type: str) -> ReductionMethod | None:
    """The method whose reduced model type, in any family (`llava_next_visionzip` too), is `model_type`."""
    found = find_model_type(model_type)
    return found[0] if found else None


def reduced_model_types() -> list[str]:
    """Every reduced model type of every method and family, in the registry's order."""
    return [classes.model_type for classes in all_classes()]


def stock_model_types() -> tuple[str, ...]:
    """The stock model types some method has a reduced class for (`llava`, `llava_next`): a family's name is its
    stock checkpoints' model type (`families.family_of_stock_type`)."""
    return tuple(dict.fromkeys(family for method in METHODS.values() for family in method.families))


__all__ = ["BenchVariant", "COMMON_CARD_FIELDS", "FamilyClasses", "METHODS", "Option", "ReductionMethod",
           "all_classes", "find_model_type", "for_model_type", "for_reduced_model_type", "get", "methods_of_family",
           "reduced_model_types", "stock_model_types"]


def labels_in_words(names=None) -> str:
    """The methods' labels as a sentence: 'VisionZip', 'VisionZip and TRIM', 'VisionZip, TRIM and PruMerge'."""
    labels = [METHODS[name].label for name in (names if names is not None else METHODS)]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
