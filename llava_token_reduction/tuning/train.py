"""`llava-token-reduction tune`: retrain the projector (or projector + LLM) of a VisionZip or TRIM checkpoint with
the reduction switched on, on LLaVA instruction data.

One accelerate loop runs everywhere: `llava-token-reduction tune ...` on one CPU or GPU, `accelerate launch
-m llava_token_reduction.tuning ...` on many GPUs (DDP, or DeepSpeed ZeRO-2 with the bundled config). See
docs/tuning.md.

Output directory:

    projector.safetensors     the tuned projector, keys multi_modal_projector.linear_{1,2}.{weight,bias}
    model/                    a complete checkpoint of the same model type with it (+ processor), reloaded and
                              compared before the command succeeds
    checkpoints/step-N/       resumable training state (accelerate state + trainer_state.json)
    log.jsonl                 one JSON object per optimizer step (loss, learning rate, gradient norm, ...)
    subset.json               the records trained on (index and id), bad_records.jsonl the skipped ones,
                              unreadable_images.jsonl those whose image only failed to decode mid-run
    summary.json              what was run and what came out
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import print_failure
from ..methods import METHODS
from .common import PROMPT_FORMATS, DataError, TuningError  # noqa: F401 - TuningError re-exported
from .export import PROJECTOR_FILE, PROJECTOR_PREFIX  # noqa: F401 - re-exported for callers of the old names
from .model_setup import _dtype  # noqa: F401 - re-exported for callers of the old name
from .recipe import UNREADABLE_FILE, Tuner  # noqa: F401 - re-exported for callers of the old names
from .state import (  # noqa: F401 - re-exported for callers of the old names
    STATE_FILE,
    RunLog,
    _check_saved_weights,
    _checkpoint_dirs,
    _keep_trainable_weights,
    _read_state,
    configure_trainable,
    tensor_digests,
)


PROG = "llava-token-reduction tune"
TRAINABLE_CHOICES = ("projector", "projector+llm")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


# Arguments -----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    io = parser.add_argument_group("model, data and output")
    io.add_argument("--model", required=True, help="a checkpoint directory (with processor) of one of the methods: "
                    + ", ".join(method.model_type for method in METHODS.values()))
    io.add_argument("--data", required=True, help="LLaVA instruction data: a JSON list or JSON Lines file")
    io.add_argument("--image-folder", help="folder the records' `image` paths are relative to")
    io.add_argument("--output-dir", required=True, help="where the projector, checkpoint, logs and states go")
    for method in METHODS.values():
        for option in method.cli_options():
            option.add_to(io, help=f"{method.label}: override the checkpoint's {option.field}")

    data = parser.add_argument_group("data selection and encoding")
    data.add_argument("--fraction", type=float, help="train on this fraction of the records (0.1 = the 1/10 subset)")
    data.add_argument("--max-samples", type=int, help="train on at most this many records")
    data.add_argument("--seed", type=int, default=0, help="seed of the subset, the data order and initialisation (0)")
    data.add_argument("--skip-bad-records", action="store_true",
                      help="skip records that fail the checks (counted and listed) instead of stopping")
    data.add_argument("--skip-text-only", action="store_true", help="drop records without an image")
    data.add_argument("--full-image-check", action="store_true",
                      help="decode every image while checking the data (default: header check only)")
    data.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                      help="chat-template (the processor's), llava-v1 (LLaVA-1.5 conversation format) or auto "
                           "(the chat template when there is one)")
    data.add_argument("--max-length", type=int, default=2048,
                      help="longest sequence in tokens, counting full image placeholder runs (2048)")
    data.add_argument("--image-aspect-ratio", choices=("pad", "crop"), default="pad",
                      help="pad to square with the mean colour as LLaVA-1.5 training does (default), or crop")
    data.add_argument("--num-workers", type=int, default=0, help="data loader worker processes (0)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--trainable", choices=TRAINABLE_CHOICES, default="projector",
                       help="projector (VisionZip recipe, default) or projector+llm (TRIM recipe); all else is frozen")
    optim.add_argument("--learning-rate", "--lr", type=float, default=2e-5, help="peak learning rate (2e-5)")
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--lr-scheduler", default="cosine",
                       choices=("cosine", "linear", "constant", "constant_with_warmup"), help="(cosine)")
    optim.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of steps spent warming up (0.03)")
    optim.add_argument("--num-epochs", type=int, default=1)
    optim.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --num-epochs)")
    optim.add_argument("--per-device-batch-size", "--batch-size", type=int, default=1, dest="per_device_batch_size")
    optim.add_argument("--gradient-accumulation-steps", type=int, default=1)
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: off)")
    optim.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                       help="autocast precision (default: accelerate's config or environment, else no)")
    optim.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations in backward")

    state = parser.add_argument_group("checkpoints, logging and output")
    state.add_argument("--save-steps", type=int, default=0,
                       help="save a resumable state every N optimizer steps (0: never)")
    state.add_argument("--save-total-limit", type=int, help="keep only the newest N states")
    state.add_argument("--resume-from-checkpoint", metavar="DIR|latest",
                       help="continue from a saved state (a checkpoints/step-N directory, or the newest one)")
    state.add_argument("--logging-steps", type=int, default=1, help="print the loss every N optimizer steps (1)")
    state.add_argument("--no-progress", action="store_true", help="no progress bar")
    state.add_argument("--save-dtype", choices=SAVE_DTYPES, default="auto",
                       help="dtype of the saved weights (auto: the input checkpoint's)")
    state.add_argument("--no-verify", action="store_true", help="skip reloading the saved checkpoint to compare it")
    return parser


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="tune the projector (or projector + LLM) with token reduction on",
        description="Retrain the multi-modal projector of a VisionZip or TRIM checkpoint (optionally the LLM too) "
                    "with the reduction active, on LLaVA instruction data. Runs under `accelerate launch` as is.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_token_reduction.tuning",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show the full traceback when the command fails")
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line unless --traceback
        if args.traceback:
            raise
        return print_failure(PROG, error)


def run(args: argparse.Namespace) -> int:
    try:
        return Tuner(args).run()
    except DataError as error:
        raise TuningError(str(error)) from None


def check_arguments(args: argparse.Namespace) -> None:
    """The argument values argparse cannot check, before anything is loaded."""
    for name in ("per_device_batch_size", "gradient_accumulation_steps", "num_epochs", "max_length", "logging_steps"):
        if getattr(args, name) < 1:
            raise TuningError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise TuningError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.save_steps < 0:
        raise TuningError(f"--save-steps must be >= 0, got {args.save_steps}")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise TuningError(f"--save-total-limit must be >= 1 (or left out to keep every state), got "
                          f"{args.save_total_limit}")
    if not 0 <= args.warmup_ratio < 1:
        raise TuningError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not Path(args.model).is_dir():
        raise TuningError(f"--model must be a local checkpoint directory, got {args.model}")
