"""The toy model: a tiny CLIP + LLaVA trained here, on synthetic scenes of coloured shapes, shipped in the package.

`toy_checkpoint("llava" | "visionzip" | "trim" | "prumerge")` is the directory of a shipped checkpoint (load it with
`AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)`); `toy_checkpoint("scene.png")` the
bundled demo scene. `llava-token-reduction toy --help` lists the commands that build, evaluate and tune it;
docs/toy_model.md describes the task, the training and the results.
"""

from pathlib import Path


ASSETS = Path(__file__).resolve().parent.parent / "assets" / "toy"


def toy_checkpoint(name: str) -> Path:
    """The path of a shipped toy file or checkpoint directory under `assets/toy/`."""
    path = ASSETS / name
    if not path.exists():
        available = sorted(p.name for p in ASSETS.iterdir()) if ASSETS.is_dir() else []
        raise ValueError(f"no toy asset {name!r}; available: {', '.join(available) or 'none (assets missing)'}")
    return path


__all__ = ["ASSETS", "toy_checkpoint"]
