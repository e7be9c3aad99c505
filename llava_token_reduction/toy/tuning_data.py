"""The toy splits as LLaVA instruction data, and the projector-tuning experiment built on them.

`projector_experiment` is the mission's "converted checkpoints with tuned projectors" at toy scale, end to end
through the project's own commands: VisionZip at a small budget loses accuracy; `tune --trainable projector`
with that budget on (train split) retrains the projector; `convert visionzip --projector` ships the tuned
checkpoint; both are scored on the held-out split.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from .scenes import TEST_SEED, TRAIN_SEED, make_split


def write_instruction_data(out, split: str = "train", images: int | None = None, max_records: int | None = None,
                           progress: bool = True) -> Path:
    """Write `out/images/NNNNN.png` and `out/{split}.json` (LLaVA-1.5's record format, one question per record).
    Returns the JSON path. `images` defaults to the split's size in the shipped recipe."""
    from .evaluate import TEST_IMAGES
    from .train import Recipe

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    recipe = Recipe()
    seed, default_images, per_image = ((TRAIN_SEED, recipe.train_images, recipe.questions_per_image)
                                       if split == "train" else (TEST_SEED, TEST_IMAGES, 2))
    data = make_split(seed, images or default_images, per_image)
    questions = data.questions[:max_records] if max_records else data.questions
    written = set()
    records = []
    for number, question in enumerate(tqdm(questions, desc=f"writing {split} data", disable=not progress)):
        name = f"images/{question.image_index:05d}.png"
        if question.image_index not in written:
            data.scenes[question.image_index].render().save(out / name)
            written.add(question.image_index)
        records.append({
            "id": f"{split}-{number:05d}", "image": name,
            "conversations": [{"from": "human", "value": "<image>\n" + question.text},
                              {"from": "gpt", "value": question.answer}],
        })
    path = out / f"{split}.json"
    path.write_text(json.dumps(records))
    return path


def projector_experiment(out, models, dominant: int, contextual: int, *, max_samples: int = 3000,
                         learning_rate: float = 1e-3, batch_size: int = 16, epochs: int = 1, limit: int | None = None,
                         progress: bool = True, seed: int = 0) -> str:
    """Run the experiment; returns a markdown report (also written to `out/report.md`)."""
    from ..conversion.converter import convert_visionzip
    from ..tuning.train import main as tune_main
    from .evaluate import STOCK, Setting, evaluate, table, test_split, visionzip_setting

    out, models = Path(out), Path(models)
    data = write_instruction_data(out / "data", "train", max_records=max_samples, progress=progress)
    argv = [
        "--model", str(models / "visionzip"), "--data", str(data), "--image-folder", str(data.parent),
        "--output-dir", str(out / "tune"), "--dominant-tokens", str(dominant), "--contextual-tokens", str(contextual),
        "--trainable", "projector", "--learning-rate", str(learning_rate), "--per-device-batch-size", str(batch_size),
        "--num-epochs", str(epochs), "--seed", str(seed), "--logging-steps", "50", "--mixed-precision", "no",
    ] + (["--no-progress"] if not progress else [])
    status = tune_main(argv)
    if status != 0:
        raise RuntimeError(f"tune exited with status {status}")
    tuned = out / "visionzip-tuned"
    convert_visionzip(
        models / "llava", tuned, projector=str(out / "tune" / "projector.safetensors"), dominant_tokens=dominant,
        contextual_tokens=contextual, overwrite=True, progress=False,
    )
    split = test_split()
    questions = split.questions[:limit] if limit else split.questions
    settings = [STOCK, visionzip_setting(dominant, contextual)]
    results = evaluate(settings, root=models, split=split, limit=limit, progress=progress)
    results += evaluate([Setting(f"VisionZip {dominant}+{contextual}, tuned projector", "visionzip-tuned")],
                        root=out, split=split, limit=limit, progress=progress)
    summary = json.loads((out / "tune" / "summary.json").read_text())
    shown = {k: summary[k] for k in summary if "loss" in k or "seconds" in k or k == "steps"}
    report = table(results, questions) + (
        f"\n\nprojector tuned on {max_samples} train-split records, {epochs} epoch(s), lr {learning_rate}, "
        f"batch {batch_size}; tune summary: {json.dumps(shown)}"
    )
    (out / "report.md").write_text(report + "\n")
    return report
