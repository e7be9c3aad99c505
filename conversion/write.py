"""Write a built checkpoint: save the model, processor and model card into the staging directory, verify the
directory by reloading it the way users do, and upload a placed output. Staging and moving into place are
`output_place.OutputPlacement`'s; `converter.convert` runs the steps in order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .build import BuiltCheckpoint
from .errors import ConversionError
from .foreign_code import foreign_code_references, strip_foreign_code
from .key_mapping import CLIP_TEXT_PREFIX
from .plan import ConversionPlan, name_list
from .sources import is_hub_id


_SAFETENSORS_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_checkpoint(plan: ConversionPlan, built: BuiltCheckpoint, model, directory: Path) -> list[str]:
    """Save `model` (with its generation config), the processor and the model card; returns the notes."""
    from transformers import GenerationConfig

    notes = []
    if (plan.src_dir / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(plan.src_dir)
    else:
        generation_config = GenerationConfig.from_model_config(model.config)
    default_length = GenerationConfig().max_length
    if generation_config.max_length != default_length:
        # LLaVA-codebase saves write their context size here (4096); kept, every
        # generate(max_new_tokens=...) would warn that both limits are set.
        notes.append(f"generation_config max_length={generation_config.max_length} dropped (a context size, "
                     "not a generation limit; pass max_new_tokens)")
        generation_config.max_length = default_length
    model.generation_config = generation_config
    _write_model(model, directory, plan.request.max_shard_size)
    _write_processor(built.processor, directory)
    stripped = strip_foreign_code(directory)
    if stripped:
        notes.append(f"dropped the inputs' auto_map code references from {', '.join(stripped)} (never run, "
                     "never shipped: the output carries only this package's code)")
    warnings = [note for note in (*plan.notes, *built.notes, *notes) if note.startswith("WARNING")]
    _write_model_card(directory, render_card(plan, built, warnings))
    return notes


def render_card(plan: ConversionPlan, built: BuiltCheckpoint, warnings: list[str]) -> str:
    from .model_card import render_model_card

    return render_model_card(
        built.config, repo_id=repo_id(plan), base_models=base_models(plan), license=license_of(plan),
        tuned_projector=plan.request.projector is not None, source_format=plan.format,
        # The text tower came with SRC (not from --clip): the weights were fine-tuned with it.
        source_is_trim_trained=plan.format == "original" and plan.has_tensors(CLIP_TEXT_PREFIX, origin="SRC"),
        extra_notes=warnings,  # e.g. a --force'd mismatch
    )


def repo_id(plan: ConversionPlan) -> str:
    request = plan.request
    return request.repo_id or request.push_to_hub or f"your-username/{plan.out.name}"


def base_models(plan: ConversionPlan) -> list[str]:
    request = plan.request
    if request.base_models:
        return list(request.base_models)
    return [request.src] if is_hub_id(request.src) and not Path(request.src).exists() else []


def license_of(plan: ConversionPlan) -> str:
    if plan.request.license:
        return plan.request.license
    readme = plan.src_dir / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                if line.strip().startswith("license:"):
                    value = line.split(":", 1)[1].strip().strip("'\"")
                    if value:
                        return value
    return "other"


def verify_checkpoint(plan: ConversionPlan, built: BuiltCheckpoint, directory: Path) -> None:
    """Reload `directory` with the Auto classes and remote code and compare every tensor with its input."""
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = plan.out_dtype
    # Before anything is loaded with remote code allowed: the only code it may name is ours.
    foreign = foreign_code_references(directory)
    if foreign:
        raise ConversionError(
            f"verification failed: the output's auto_map names code that is not this package's, or whose file is "
            f"missing: {name_list(foreign)}"
        )
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            directory, trust_remote_code=True, dtype=dtype, output_loading_info=True
        )
    except Exception as error:  # noqa: BLE001
        raise ConversionError(f"verification failed: the written checkpoint does not load: {error}") from None
    names = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
    problems = {name: info.get(name) for name in names if info.get(name)}
    if problems:
        raise ConversionError(f"verification failed: loading the written checkpoint reported {problems}")
    if type(model) is not plan.classes.generation_class:
        raise ConversionError(f"verification failed: the output loads as {type(model).__name__}")
    loaded = model.state_dict()
    if set(loaded) != set(built.tensors):
        raise ConversionError(
            f"verification failed: reloaded tensors differ in names: {name_list(set(loaded) ^ set(built.tensors))}"
        )
    for key in tqdm(list(loaded), desc="Verifying tensors", disable=not plan.request.progress):
        wanted = built.tensor(key, dtype)
        if not _same_values(loaded[key].to(wanted.dtype), wanted):
            source = built.tensors[key]
            raise ConversionError(f"verification failed: {key} differs from {source.origin} {source.key}")
    del model, loaded
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                stored = handle.get_slice(key).get_dtype()
                if stored in ("F16", "BF16", "F32", "F64") and stored != _SAFETENSORS_NAME[dtype]:
                    raise ConversionError(f"verification failed: {file.name}:{key} is stored as {stored}")
    try:
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    except Exception as error:  # noqa: BLE001
        raise ConversionError(f"verification failed: the written processor does not load: {error}") from None
    if type(processor) is not plan.classes.processor_class:
        raise ConversionError(f"verification failed: the processor loads as {type(processor).__name__}")
    if processor.image_token_id != built.config.image_token_id:
        raise ConversionError(
            f"verification failed: processor image token id {processor.image_token_id} != config.image_token_id "
            f"{built.config.image_token_id}"
        )


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors, with NaN equal to NaN in the same places (a NaN copied faithfully is not a difference)."""
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


# The write steps, separate so that tests can interrupt a conversion between them.
def _write_model(model, directory: Path, max_shard_size) -> None:
    model.save_pretrained(directory, max_shard_size=max_shard_size)


def _write_processor(processor, directory: Path) -> None:
    processor.save_pretrained(directory)


def _write_model_card(directory: Path, text: str) -> None:
    (directory / "README.md").write_text(text, encoding="utf-8")


def push_to_hub(directory: Path, repo_id: str, *, private: bool = False) -> None:
    """Upload a verified output directory to the hub (creating the model repository if needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                          commit_message="Upload checkpoint converted with llava-token-reduction")
    except Exception as error:  # noqa: BLE001
        raise ConversionError(
            f"written and verified {directory}, but the upload to {repo_id} failed: {error}"
        ) from None
