"""Render the README.md (model card) of a converted checkpoint from the templates in `model_cards/`.

The templates use `string.Template` placeholders (`$name`), which never clash with the braces of the Python
snippets. Published numbers live in the templates themselves (from docs/visionzip.md §7 and docs/trim.md §9);
this module fills in what depends on the checkpoint: repository id, base models, license, budget, conversion notes.
"""

import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path
from string import Template

from ..methods import COMMON_CARD_FIELDS, all_classes, find_model_type


# The example image of the usage snippets (the COCO picture transformers' documentation uses). `load_image`
# also accepts a local path, so tests swap this string for a file.
EXAMPLE_IMAGE_URL = "http://images.cocodataset.org/val2017/000000039769.jpg"
TEMPLATE_NAMES = {classes.model_type: classes.card_template for classes in all_classes()}


@dataclass(frozen=True)
class CardContext:
    """What a method's card-fields function (`ReductionMethod.card_fields_function`) may use besides the config."""

    repo_id: str  # the hub id the snippets load
    base: str  # how the intro names the base model: "`owner/name`" or "a LLaVA-1.5 checkpoint" (the family's label)
    tuned_projector: bool
    source_is_trim_trained: bool


def template_text(name: str) -> str:
    """The text of template `name`: from the installed `llava_token_reduction.model_cards` package, else from
    the repository's top-level `model_cards/` next to `conversion/` (source checkouts, editable installs)."""
    try:
        return importlib.resources.files("llava_token_reduction.model_cards").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        path = Path(__file__).resolve().parent.parent / "model_cards" / name
        return path.read_text(encoding="utf-8")


def _yaml_list(key: str, values) -> str:
    values = [v for v in values if v]
    if not values:
        return ""
    return f"{key}:\n" + "\n".join(f"- {json.dumps(v)}" for v in values)


def _bullets(lines) -> str:
    return "\n".join(f"- {line}" for line in lines) if lines else "- (no details recorded)"


def render_model_card(
    config,
    *,
    repo_id: str,
    base_models=(),
    license: str = "other",
    tuned_projector: bool = False,
    source_format: str = "stock",
    source_is_trim_trained: bool = False,
    extra_notes=(),
) -> str:
    """The model card of a checkpoint with `config` (the config of one of the registry's classes, in any family:
    the template and fields are those of the method's classes in the config's family).

    Args:
        repo_id: the hub id the usage snippets load (`owner/name`).
        base_models: hub ids for the `base_model` metadata (omitted when empty).
        license: the `license` metadata value (e.g. "llama2", "apache-2.0", "other").
        tuned_projector: the projector was replaced by a tuned one (`--projector`).
        source_format: "stock" (transformers LLaVA) or "original" (LLaVA codebase).
        source_is_trim_trained: the weights come from a checkpoint fine-tuned with TRIM active.
        extra_notes: more lines for the "Conversion" section.
    """
    model_type = getattr(config, "model_type", None)
    found = find_model_type(model_type)
    if found is None:
        raise ValueError(f"no model card template for model_type {model_type!r}; expected one of "
                         f"{sorted(TEMPLATE_NAMES)}")
    method, classes = found
    family = classes.model_family
    base_models = [b for b in base_models if b]
    base = f"`{base_models[0]}`" if base_models else f"a {family.label} checkpoint"
    source_kind = (f"a transformers {family.label} checkpoint" if source_format == "stock"
                   else "an original LLaVA-codebase checkpoint")
    notes = [
        f"Converted by `llava-token-reduction convert {method.name}` "
        f"from {base} ({source_kind}).",
        f"Weights stored as {str(getattr(config, 'dtype', None) or 'float32').replace('torch.', '')} safetensors; "
        "every tensor was compared with its source after writing.",
    ]
    if tuned_projector:
        notes.append("The multi-modal projector was replaced by one tuned for the reduced tokens.")
    notes += list(extra_notes)
    fields = {
        "license": license or "other",
        "base_model_yaml": _yaml_list("base_model", base_models),
        "repo_id": repo_id,
        "image_url": EXAMPLE_IMAGE_URL,
        "image_seq_length": config.image_seq_length,
        "conversion_notes": _bullets(notes),
    }
    fields.update(classes.card_fields_function(config, CardContext(
        repo_id=repo_id, base=base, tuned_projector=tuned_projector, source_is_trim_trained=source_is_trim_trained)))
    missing = [name for name in (*COMMON_CARD_FIELDS, *classes.card_fields) if name not in fields]
    if missing:
        raise ValueError(f"the {method.label} card fields lack {missing}")
    card = Template(template_text(classes.card_template)).substitute(fields)
    # An empty base_model block would leave a blank line inside the YAML header.
    return card.replace("\n\ntags:\n", "\ntags:\n", 1)


def extract_python_snippets(card: str) -> list[str]:
    """The ```python code blocks of a rendered card, in order."""
    snippets, inside, lines = [], False, []
    for line in card.splitlines():
        if not inside and line.strip() == "```python":
            inside, lines = True, []
        elif inside and line.strip() == "```":
            inside = False
            snippets.append("\n".join(lines) + "\n")
        elif inside:
            lines.append(line)
    return snippets


__all__ = ["render_model_card", "extract_python_snippets", "template_text", "EXAMPLE_IMAGE_URL"]
