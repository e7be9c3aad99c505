"""Render the README.md (model card) of a converted checkpoint from the templates in `model_cards/`.

The templates use `string.Template` placeholders (`$name`), which never clash with the braces of the Python
snippets. Published numbers live in the templates themselves (from docs/visionzip.md §7 and docs/trim.md §9); this module
fills in what depends on the checkpoint: repository id, base models, license, budget, conversion notes.
"""

import importlib.resources
import json
from pathlib import Path
from string import Template


# The example image of the usage snippets (the COCO picture transformers' documentation uses). `load_image`
# also accepts a local path, so tests swap this string for a file.
EXAMPLE_IMAGE_URL = "http://images.cocodataset.org/val2017/000000039769.jpg"
TEMPLATE_NAMES = {"llava_visionzip": "visionzip.md", "llava_trim": "trim.md"}
PUBLISHED_VISIONZIP_BUDGETS = {(54, 10): 64, (108, 20): 128, (162, 30): 192}


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
    """The model card of a checkpoint with `config` (a `LlavaVisionZipConfig` or `LlavaTrimConfig`).

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
    if model_type not in TEMPLATE_NAMES:
        raise ValueError(f"no model card template for model_type {model_type!r}; expected one of {sorted(TEMPLATE_NAMES)}")
    base_models = [b for b in base_models if b]
    base = f"`{base_models[0]}`" if base_models else "a LLaVA-1.5 checkpoint"
    source_kind = "a transformers LLaVA checkpoint" if source_format == "stock" else "an original LLaVA-codebase checkpoint"
    notes = [
        f"Converted by `llava-token-reduction convert {'visionzip' if model_type == 'llava_visionzip' else 'trim'}` "
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
    if model_type == "llava_visionzip":
        budget = (config.dominant_tokens, config.contextual_tokens)
        published = PUBLISHED_VISIONZIP_BUDGETS.get(budget)
        if published:
            budget_note = (f"This checkpoint's default budget, {config.tokens_per_image} tokens per image, is one of the "
                           f"published ones: see the rows \"VisionZip {published}\""
                           + (" and \"VisionZip‡ " + str(published) + "\" (tuned projector)." if tuned_projector else "."))
        else:
            budget_note = (f"This checkpoint's default budget ({config.dominant_tokens}+{config.contextual_tokens} = "
                           f"{config.tokens_per_image} tokens per image) is not among the published budgets.")
        fields.update(
            title=f"{repo_id.split('/')[-1]}: LLaVA with VisionZip ({config.tokens_per_image} image tokens)",
            intro=f"{base} with **VisionZip** visual-token reduction: each image reaches the language model as "
                  f"{config.tokens_per_image} tokens instead of {config.image_seq_length}.",
            weights_note=" except for a projector tuned for the reduced tokens" if tuned_projector else "",
            visionzip_layer=config.visionzip_layer,
            dominant_tokens=config.dominant_tokens,
            contextual_tokens=config.contextual_tokens,
            tokens_per_image=config.tokens_per_image,
            budget_note=budget_note,
        )
    else:
        bounds = []
        if config.trim_min_tokens is not None:
            bounds.append(f"at least {config.trim_min_tokens}")
        if config.trim_max_tokens is not None:
            bounds.append(f"at most {config.trim_max_tokens}")
        budget = "the number of kept patches depends on the image and the question"
        budget += f" ({' and '.join(bounds)} patches)" if bounds else " (no bounds set)"
        budget += ", plus one mean token." if config.trim_append_mean_token else "."
        budget += (" Bounds can be set at load time, e.g. `from_pretrained(model_id, trust_remote_code=True, "
                   "trim_max_tokens=128)`.")
        if source_is_trim_trained:
            warning = ("These weights come from a checkpoint fine-tuned with TRIM active (projector and language model "
                       "trained on the reduced tokens), as the authors released it.")
        else:
            warning = ("**Note:** these are LLaVA weights that were not trained with TRIM. The authors fine-tuned their "
                       "released checkpoints with TRIM active, and TRIM applied training-free to stock LLaVA weights "
                       "was reported to produce poor output. Evaluate before relying on it.")
        fields.update(
            title=f"{repo_id.split('/')[-1]}: LLaVA with TRIM (question-aware token reduction)",
            intro=f"{base} with **TRIM** visual-token reduction: each image keeps only the patches that CLIP's "
                  "question-conditioned scores single out, plus one token summarising the rest.",
            training_warning=warning,
            iqr_multiplier=config.trim_iqr_multiplier,
            mean_token=(", and the mean of all the other patches is appended as one extra token"
                        if config.trim_append_mean_token else " (this checkpoint appends no mean token)"),
            score_sign=(
                "As in the released TRIM code and checkpoints (`trim_negate_similarity=True`, this checkpoint's "
                "setting), the softmax is taken over the *negated* dot product, which the authors trained with."
                if config.trim_negate_similarity else
                "This checkpoint scores by the plain dot product (`trim_negate_similarity=False`); the released "
                "TRIM code and checkpoints negate it."
            ),
            coupling=(", pooled over all images of a call as in the released code" if config.trim_batch_coupled
                      else " of each image, so an image gets the same tokens alone or in a batch"),
            budget_description=budget,
        )
    card = Template(template_text(TEMPLATE_NAMES[model_type])).substitute(fields)
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
