"""What `demo` does without `--model`: run on the shipped toy model (trained, so the answers are real) unless
`--random-weights` asks for the LLaVA-1.5-shaped random model (576 patches, the right tool for timings).

`demo.run` calls `use_toy_model(args)` before it runs and prints `toy_footer()` after the report; nothing else
in the demo knows about the toy.
"""

from __future__ import annotations

import argparse

from . import ASSETS, toy_checkpoint
from .ship import ACCURACY_FILE, DEMO_QUESTION, SCENE_FILE


TOY_NOTICE = (
    "model: the TOY LLaVA shipped in this package (a 4-layer CLIP ViT + 2-layer Llama, 64 patches per image, trained\n"
    "       here on synthetic scenes of coloured shapes; see docs/toy_model.md). Its answers are real; it knows\n"
    "       nothing but these scenes. `demo --random-weights` runs the LLaVA-1.5-shaped random model (576 patches)."
)


def use_toy_model(args: argparse.Namespace, default_question: str) -> bool:
    """Point `args` at the toy TRIM checkpoint (VisionZip shares its weights, stock LLaVA is their twin), the
    bundled scene and a question about it, unless the user chose a model or `--random-weights`. Returns
    whether the toy is used."""
    if args.model is not None or getattr(args, "random_weights", False):
        return False
    args.model = str(toy_checkpoint("trim"))
    if args.image is None:
        args.image = str(toy_checkpoint(SCENE_FILE))
    if args.question == default_question:
        args.question = DEMO_QUESTION
    if args.dtype == "auto":
        args.dtype = "float32"  # stored in float16 to stay small; computed in float32 on a CPU
    return True


def toy_footer() -> str:
    table = (ASSETS / ACCURACY_FILE).read_text().rstrip()
    return (
        f"Held-out accuracy of the toy (shipped with it, measured by `llava-token-reduction toy eval`, which\n"
        f"recomputes it in about a minute):\n\n{table}"
    )
