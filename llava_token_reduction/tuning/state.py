"""What a tuning run keeps between steps and restarts: digests of the frozen weights, which parameters train,
the saved states (`step-N/` with `trainer_state.json`), the run log, and the checks of saved weights."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from .common import TuningError


STATE_FILE = "trainer_state.json"


def tensor_digests(named_tensors, dtype) -> dict[str, str]:
    """Per tensor, a hash of its bytes after casting to `dtype` (floating tensors only are cast)."""
    import torch

    digests = {}
    for name, tensor in named_tensors:
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        data = tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes()
        digests[name] = hashlib.blake2b(data, digest_size=16).hexdigest()
    return digests


def configure_trainable(model, trainable: str) -> list[str]:
    """Freeze everything, then unfreeze the projector (and the language model and LM head). Returns the names
    of the trainable parameters."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if trainable == "projector+llm":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def _checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _read_state(directory: Path) -> dict:
    """A saved state's trainer_state.json, or a TuningError naming the file when it is not a complete one."""
    path = Path(directory) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TuningError(f"saved training state {path} is unreadable ({' '.join(str(error).split())})") from None
    missing = [key for key in ("global_step", "epoch", "batch_in_epoch", "run") if key not in state] if isinstance(
        state, dict) else ["everything"]
    if missing:
        raise TuningError(f"saved training state {path} is incomplete (no {', '.join(missing)})")
    return state


class RunLog:
    """Loss and event records: JSON Lines on the main process, lines on stdout."""

    def __init__(self, path: Path, enabled: bool, resume: bool):
        self.enabled = enabled
        self.handle = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "a" if resume else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _keep_trainable_weights(models, weights, output_dir) -> None:
    """accelerate save hook: store only trainable parameters in training states (frozen weights are in --model)."""
    for number, model in enumerate(models):
        names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        weights[number] = {name: tensor for name, tensor in weights[number].items() if name in names}


def _check_saved_weights(directory: Path, accelerator, model) -> None:
    """Before a non-strict load: the state must hold exactly the trainable parameters."""
    from safetensors import safe_open

    path = directory / "model.safetensors"
    if not path.is_file():
        raise TuningError(f"cannot resume from {directory}: no model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        saved = set(handle.keys())
    names = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    if saved != names:
        missing, extra = sorted(names - saved), sorted(saved - names)
        raise TuningError(f"cannot resume from {directory}: its weights do not match the trainable parameters "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """The saved state `--resume-from-checkpoint VALUE` names (`latest`: the newest readable one), or None."""
    if not value:
        return None
    if value == "latest":
        found = _checkpoint_dirs(output_dir)
        if not found:
            raise TuningError(f"--resume-from-checkpoint latest: no saved state under {output_dir / 'checkpoints'}")
        for directory in reversed(found):
            try:
                _read_state(directory)
            except TuningError as error:  # e.g. cut short by a crash while saving: take the one before
                print(f"warning: {error}; trying the previous saved state", file=sys.stderr)
                continue
            return directory
        raise TuningError(f"--resume-from-checkpoint latest: no readable saved state under "
                          f"{output_dir / 'checkpoints'}")
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise TuningError(f"--resume-from-checkpoint {path}: not a saved training state (no {STATE_FILE})")
    _read_state(path)
    return path


def save_training_state(accelerator, output_dir: Path, save_total_limit, global_step: int, epoch: int,
                        batch_in_epoch: int, batches_per_epoch: int, run_shape: dict) -> Path:
    """Save a resumable state as `checkpoints/step-N/` (accelerate's state + STATE_FILE); keep the newest
    `save_total_limit`. Returns the directory."""
    import shutil

    directory = output_dir / "checkpoints" / f"step-{global_step:08d}"
    if accelerator.distributed_type.value == "DEEPSPEED":
        accelerator.save_state(str(directory), exclude_frozen_parameters=True)
    else:
        accelerator.save_state(str(directory))
    if accelerator.is_main_process:
        if batch_in_epoch >= batches_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
        state = {"global_step": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "run": run_shape}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        if save_total_limit:
            for old in _checkpoint_dirs(output_dir)[: -save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return directory


__all__ = [
    "tensor_digests", "configure_trainable", "_checkpoint_dirs", "_read_state", "RunLog", "_keep_trainable_weights",
    "_check_saved_weights", "STATE_FILE", "resolve_resume", "save_training_state",
]
