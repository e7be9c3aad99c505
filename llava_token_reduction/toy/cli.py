"""`llava-token-reduction toy ...`: the small trained model that ships with the package.

    toy build OUT [--quick]                   train CLIP and LLaVA from nothing, convert, write OUT/...
    toy eval [--models DIR] [--plot PNG]      held-out accuracy vs image tokens, stock and every reduction
    toy ship BUILD                            copy a build into the package (cards, accuracy table, scene)
    toy clip-check [--models DIR]             does the CLIP tell shapes and sides apart (retrieval, linear probe)
    toy selection [--models DIR]              what TRIM (both signs) and VisionZip keep, against the scenes
    toy tune OUT [--models DIR]               VisionZip at a small budget, projector tuned with it on, then
                                              `convert --projector`; accuracy before and after
    toy data OUT [--split train|test]         write a split as LLaVA instruction data (JSON + PNG images)
    toy lmms-task OUT [--overwrite]           write the held-out split as an offline lmms-eval task (toy_heldout)
    toy lm-study [--order ...] [--features ...]
                                              train the LLaVA stage alone (prompt order, tower or symbolic
                                              features) and print accuracy by kind as it learns

The shipped models live in `llava_token_reduction/assets/toy/{llava,visionzip,trim,prumerge}`. They are a toy:
a 4-layer ViT and a 3-layer Llama trained on synthetic scenes of coloured shapes, nothing more.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "toy", help="the small trained toy model: build it from nothing, evaluate it, tune its projector",
        description="A tiny CLIP + LLaVA trained here on synthetic scenes of coloured shapes (shipped in the "
                    "package): real answers and real accuracy-vs-tokens numbers on a CPU.",
    )
    actions = parser.add_subparsers(title="actions", dest="action", metavar="ACTION")
    actions.required = True

    build = actions.add_parser("build", help="train CLIP and LLaVA from nothing, convert (about 15 min, 2 cores)")
    build.add_argument("out", metavar="OUT", help="output directory (checkpoints and build.json)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke run, not a model)")
    build.add_argument("--clip-steps", type=int, help="contrastive steps (default: the recipe's)")
    build.add_argument("--llava-steps", type=int, help="LLaVA steps (default: the recipe's)")
    build.add_argument("--llava-lr", type=float, help="LLaVA peak learning rate (default: the recipe's)")
    build.add_argument("--clip-from", metavar="DIR", help="reuse the CLIP of an earlier build (skips stage 1)")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(handler=run_build)

    evaluate = actions.add_parser("eval", help="held-out accuracy vs image tokens (markdown table, optional plot)")
    evaluate.add_argument("--models", metavar="DIR", help="a `toy build` output (default: the shipped models)")
    evaluate.add_argument("--limit", type=int, help="only the first N held-out questions")
    evaluate.add_argument("--plot", metavar="PNG", help="also draw accuracy vs image tokens")
    evaluate.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=run_eval)

    ship = actions.add_parser("ship", help="copy a `toy build` output into the package, with cards and accuracy")
    ship.add_argument("build", metavar="BUILD", help="a `toy build` output directory")
    ship.add_argument("--assets", metavar="DIR", help="destination (default: the package's assets/toy)")
    ship.add_argument("--tuned", metavar="DIR", help="a `toy tune` output: ship its projector and report too")
    ship.add_argument("--plot", metavar="PNG", help="also draw accuracy vs image tokens")
    ship.add_argument("--no-progress", action="store_true")
    ship.set_defaults(handler=run_ship)

    check = actions.add_parser("clip-check", help="does the toy CLIP tell shapes and sides apart (about a minute)")
    check.add_argument("--models", metavar="DIR", help="a `toy build` output with clip/ (default: the shipped models)")
    check.add_argument("--groups", type=int, default=100, help="held-out contrastive groups (default 100)")
    check.add_argument("--probe-scenes", type=int, default=1500, help="scenes the linear probes train on (default "
                       "1500; they test on a fifth as many others)")
    check.set_defaults(handler=run_clip_check)

    experiments = actions.add_parser("selection", help="what TRIM (both signs) and VisionZip keep, against the scenes")
    experiments.add_argument("--models", metavar="DIR", help="a `toy build` output (default: the shipped models)")
    experiments.add_argument("--limit", type=int, help="only the first N questions that name an object")
    experiments.add_argument("--no-progress", action="store_true")
    experiments.set_defaults(handler=run_selection)

    tune = actions.add_parser("tune", help="projector tuning recovering VisionZip accuracy at a small budget")
    tune.add_argument("out", metavar="OUT", help="working directory (data, tune output, converted checkpoint)")
    tune.add_argument("--models", metavar="DIR", help="a `toy build` output (default: the shipped models)")
    tune.add_argument("--dominant-tokens", type=int, default=6)
    tune.add_argument("--contextual-tokens", type=int, default=2)
    tune.add_argument("--max-samples", type=int, default=3000, help="training records (default 3000)")
    tune.add_argument("--learning-rate", type=float, default=1e-3)
    tune.add_argument("--batch-size", type=int, default=16)
    tune.add_argument("--no-progress", action="store_true")
    tune.set_defaults(handler=run_tune)

    data = actions.add_parser("data", help="write a split as LLaVA instruction data (JSON + PNGs)")
    data.add_argument("out", metavar="OUT")
    data.add_argument("--split", choices=("train", "test"), default="train")
    data.set_defaults(handler=run_data)

    task = actions.add_parser("lmms-task", help="write the held-out split as an offline lmms-eval task (toy_heldout)",
                              description="Write the 500 held-out questions as an lmms-eval task folder (images, "
                                          "metadata, task YAML): `--include_path OUT --tasks toy_heldout` scores a "
                                          "toy checkpoint as `toy eval` does.")
    task.add_argument("out", metavar="OUT", help="the task folder (must not exist or be empty, unless --overwrite)")
    task.add_argument("--overwrite", action="store_true", help="replace OUT if this command wrote it")
    task.add_argument("--no-progress", action="store_true")
    task.set_defaults(handler=run_lmms_task)

    lm = actions.add_parser("lm-study", help="train the LLaVA stage alone and print its accuracy as it learns "
                                             "(prompt order, tower or symbolic features; ~8 min at the defaults)")
    lm.add_argument("--models", metavar="DIR", help="whose llava/ tower to use (default: the shipped models)")
    lm.add_argument("--order", choices=("question-first", "image-first"), default="question-first",
                    help="where the image goes in the user turn (default: question-first, the shipped template; "
                         "image-first is LLaVA-1.5's)")
    lm.add_argument("--features", choices=("tower", "symbolic"), default="tower",
                    help="the frozen tower's output, or the scene as symbols on the patch grid (default: tower)")
    lm.add_argument("--steps", type=int, help="training steps (default: `toy build`'s)")
    lm.add_argument("--lr", type=float, help="peak learning rate (default: `toy build`'s)")
    lm.add_argument("--batch-size", type=int, default=32)
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--every", type=int, default=500, help="score every N steps (default 500)")
    lm.add_argument("--train-images", type=int, default=6000)
    lm.add_argument("--background-drop", type=float, metavar="P",
                    help="share of the examples shown with some background patches left out (default: `toy build`'s)")
    lm.add_argument("--standardize-projector", action="store_true",
                    help="start the projector on standardised features (their mean and scale folded into it)")
    lm.add_argument("--no-progress", action="store_true")
    lm.set_defaults(handler=run_lm_study)


def torch_threads(threads):
    from .build import torch_threads as threads_context

    return threads_context(threads)


def _root(args) -> Path:
    from . import ASSETS

    return Path(args.models) if args.models else ASSETS


def run_build(args: argparse.Namespace) -> int:
    from .build import build
    from .train import Recipe

    recipe = Recipe(seed=args.seed)
    if args.quick:
        recipe = Recipe(seed=args.seed, train_images=64, clip_steps=3, clip_batch=8, llava_steps=3, llava_batch=4,
                        clip_check_groups=4)
    given = (("clip_steps", args.clip_steps), ("llava_steps", args.llava_steps), ("llava_lr", args.llava_lr))
    changes = {k: v for k, v in given if v}
    if changes:
        from dataclasses import replace

        recipe = replace(recipe, **changes)
    record = build(args.out, recipe, progress=not args.no_progress, clip_from=args.clip_from)
    print(json.dumps(record, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, table, test_split

    split = test_split()
    questions = split.questions[: args.limit] if args.limit else split.questions
    started = time.monotonic()
    with torch_threads(1):
        results = evaluate(root=_root(args), split=split, limit=args.limit, progress=not args.no_progress)
    print(table(results, questions))
    print(f"({time.monotonic() - started:.0f} s)")
    if args.plot:
        from .plots import accuracy_plot

        accuracy_plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps([
            {"setting": r.setting.label, "kind": r.setting.kind, "overrides": r.setting.overrides,
             "accuracy": r.accuracy, "mean_tokens": r.mean_tokens, "by_kind": r.by_kind()} for r in results
        ], indent=2) + "\n")
    return 0


def run_ship(args: argparse.Namespace) -> int:
    from . import ASSETS
    from .evaluate import evaluate, table, test_split
    from .ship import ship

    split = test_split()
    with torch_threads(1):
        results = evaluate(root=args.build, split=split, progress=not args.no_progress)
    accuracy = table(results, split.questions)
    print(accuracy)
    if args.plot:
        from .plots import accuracy_plot

        accuracy_plot(results, args.plot)
        print(f"wrote {args.plot}")
    print(f"shipped to {ship(args.build, args.assets or ASSETS, accuracy, tuned=args.tuned)}")
    return 0


def run_selection(args: argparse.Namespace) -> int:
    from .evaluate import test_split
    from .experiments import trim_sign_report, visionzip_object_report

    split = test_split()
    with torch_threads(1):
        print(trim_sign_report(_root(args), split, limit=args.limit, progress=not args.no_progress))
        print()
        print(visionzip_object_report(_root(args), split))
    return 0


def run_clip_check(args: argparse.Namespace) -> int:
    import torch
    from transformers import CLIPModel

    from .probe import clip_report

    if args.groups < 1 or args.probe_scenes < 5:
        raise ValueError(f"--groups must be >= 1 and --probe-scenes >= 5, got {args.groups} and {args.probe_scenes}")
    directory = _root(args) / "clip"
    if not (directory / "config.json").is_file():
        raise ValueError(f"no CLIP checkpoint in {directory} (a `toy build` output has one in clip/)")
    with torch_threads(1):
        model = CLIPModel.from_pretrained(directory, dtype=torch.float32).eval()
        print(clip_report(model, groups=args.groups, probe_scenes=args.probe_scenes))
    return 0


def run_data(args: argparse.Namespace) -> int:
    from .tuning_data import write_instruction_data

    path = write_instruction_data(args.out, args.split)
    print(f"wrote {path}")
    return 0


def run_lm_study(args: argparse.Namespace) -> int:
    from .lm_study import HEADER, row_text, study
    from .train import Recipe

    args.steps = args.steps or Recipe.llava_steps
    args.lr = args.lr or Recipe.llava_lr
    print(f"LLaVA stage alone: {args.order}, {args.features} features, {args.steps} steps at lr {args.lr}, "
          f"batch {args.batch_size}, seed {args.seed} (teacher-forced first answer token)")
    print(HEADER, flush=True)
    with torch_threads(1):
        study(_root(args), order=args.order, features=args.features, steps=args.steps, lr=args.lr,
              batch_size=args.batch_size, seed=args.seed, every=args.every, train_images=args.train_images,
              standardize=args.standardize_projector, progress=not args.no_progress,
              background_drop=Recipe.background_drop if args.background_drop is None else args.background_drop,
              on_row=lambda row: print(row_text(row), flush=True))
    return 0


def run_lmms_task(args: argparse.Namespace) -> int:
    from .lmms_task import TASK_NAME, lmms_eval_commands, write_lmms_task

    out = write_lmms_task(args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote the lmms-eval task {TASK_NAME} to {out}; score the shipped toy checkpoints with")
    print(lmms_eval_commands(out))
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from .tuning_data import projector_experiment

    with torch_threads(1):
        report = projector_experiment(
        args.out, _root(args), args.dominant_tokens, args.contextual_tokens, max_samples=args.max_samples,
            learning_rate=args.learning_rate, batch_size=args.batch_size, progress=not args.no_progress,
        )
    print(report)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from ..cli import main

    sys.exit(main(["toy", *sys.argv[1:]]))
