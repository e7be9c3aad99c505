"""The tuned outputs: `projector.safetensors` and the complete checkpoint `model/` in the save dtype, written
after checking that no frozen parameter changed, then reloaded and compared (unless `--no-verify`)."""

from __future__ import annotations

from pathlib import Path

from .common import TuningError
from .state import tensor_digests


PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_PREFIX = "model.multi_modal_projector."


def export_tuned(output_dir: Path, args, dtype, unwrapped, processor, state_dict: dict, trainable_names,
                 frozen_before: dict) -> dict:
    """Write the projector and the full checkpoint in `dtype`, then reload and compare; returns the summary.

    `unwrapped` is the trained model (outside accelerate's wrappers), `state_dict` its full state (gathered by
    `accelerator.get_state_dict`), `frozen_before` the digests of the frozen parameters taken before training."""
    import torch
    from safetensors.torch import load_file, save_file

    frozen_names = set(frozen_before)
    frozen_after = tensor_digests(((n, p) for n, p in unwrapped.named_parameters() if n in frozen_names), dtype)
    changed = sorted(name for name in frozen_names if frozen_after[name] != frozen_before[name])
    if changed:
        raise TuningError(f"frozen parameters changed during training: {', '.join(changed[:5])}")

    cast = {name: (t.detach().to("cpu", dtype) if t.is_floating_point() else t.detach().cpu()).contiguous()
            for name, t in state_dict.items()}
    projector = {name[len("model."):]: cast[name].clone() for name in cast if name.startswith(PROJECTOR_PREFIX)}
    expected = {f"multi_modal_projector.linear_{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias")}
    if set(projector) != expected:
        raise TuningError(f"unexpected projector tensors {sorted(projector)}; expected {sorted(expected)}")
    projector_file = output_dir / PROJECTOR_FILE
    save_file(projector, str(projector_file),
              metadata={"format": "pt", "model_type": unwrapped.config.model_type, "trainable": args.trainable,
                        "source": str(args.model)})

    if args.gradient_checkpointing:
        disable = getattr(unwrapped, "activation_checkpointing_disable", None)
        (disable or unwrapped.gradient_checkpointing_disable)()
    unwrapped.config.text_config.use_cache = True
    unwrapped.config.dtype = dtype
    model_dir = output_dir / "model"
    unwrapped.save_pretrained(str(model_dir), state_dict=cast)
    processor.save_pretrained(str(model_dir))
    summary = {"projector": str(projector_file), "model": str(model_dir),
               "model_type": unwrapped.config.model_type, "trainable": args.trainable,
               "save_dtype": str(dtype).replace("torch.", ""), "frozen_tensors_unchanged": len(frozen_names),
               "verified": False}
    if args.no_verify:
        return summary

    from transformers import AutoModelForImageTextToText

    reloaded = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=dtype)
    if type(reloaded).__name__ != type(unwrapped).__name__:
        raise TuningError(f"the saved checkpoint reloads as {type(reloaded).__name__}, not {type(unwrapped).__name__}")
    from_file = load_file(str(projector_file))
    reloaded_state = reloaded.state_dict()
    for name, tensor in from_file.items():
        if not torch.equal(reloaded_state["model." + name].to(dtype), tensor):
            raise TuningError(f"verification failed: {name} differs between the checkpoint and {PROJECTOR_FILE}")
    for name in trainable_names:
        if not torch.equal(reloaded_state[name].to(dtype), cast[name]):
            raise TuningError(f"verification failed: tuned tensor {name} did not round-trip")
    reloaded_frozen = tensor_digests(((n, t) for n, t in reloaded_state.items() if n in frozen_names), dtype)
    changed = sorted(name for name in frozen_names if reloaded_frozen.get(name) != frozen_before[name])
    if changed:
        raise TuningError(f"verification failed: frozen tensors differ from the input checkpoint: {changed[:5]}")
    summary["verified"] = True
    return summary
