"""What a tuning run keeps between steps and restarts: digests of the frozen weights, which parameters train,
the saved states (`step-N/` with `trainer_state.json`), the run log, and the checks of saved weights."""

from __future__ import annotations

import hashlib
import json
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


__all__ = ['tensor_digests', 'configure_trainable', '_checkpoint_dirs', '_read_state', 'RunLog', '_keep_trainable_weights', '_check_saved_weights', 'STATE_FILE']
