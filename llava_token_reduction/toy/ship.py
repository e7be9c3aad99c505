"""`toy ship BUILD`: copy a `toy build` output into the package (`assets/toy/`) with honest model cards, the
bundled demo scene and the held-out accuracy table the demo prints.

The shipped checkpoints carry no code: `convert` writes our modeling files and `auto_map` entries next to the
weights so that a checkpoint on the hub loads with `trust_remote_code=True`, but inside the package those copies
would only go stale next to `modeling/`. `import llava_token_reduction` registers the classes with the Auto
classes, which is how the package's own checkpoints load (`strip_code`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..conversion.foreign_code import strip_foreign_code
from .scenes import Question, Scene
from .train import TASK_WORDS, TOY_SHAPE


SHIPPED = ("llava", "visionzip", "trim", "prumerge")
ACCURACY_FILE = "accuracy.md"
SCENE_FILE = "scene.png"

WHAT = {
    "llava": ("stock LLaVA (`LlavaForConditionalGeneration`), all 16 patch tokens per image",
              "the trained weights as they are"),
    "visionzip": ("LLaVA with VisionZip (`llava_visionzip`), 13+3 tokens by default, any budget at load time",
                  "`llava-token-reduction convert visionzip` of the `llava` checkpoint: the same weights"),
    "trim": ("LLaVA with TRIM (`llava_trim`), adaptive token count, question scored with the toy CLIP's text tower",
             "`llava-token-reduction convert trim` of the `llava` checkpoint with the toy CLIP (`--clip`): the same "
             "LLaVA weights plus the CLIP text tower and `visual_projection`"),
    "prumerge": ("LLaVA with PruMerge (`llava_prumerge`), adaptive token count from the CLS attention's outliers; "
                 "PruMerge+ with `prumerge_plus=True` at load time",
                 "`llava-token-reduction convert prumerge` of the `llava` checkpoint: the same weights"),
}


def demo_question() -> Question:
    """The demo's question: the held-out split's first colour question about a scene of three or more objects.
    The rule was fixed before the fifth pass's model was trained: it is not a pick among the questions the model
    answers correctly."""
    from .evaluate import test_split

    split = test_split()
    return next(q for q in split.questions if q.kind == "color" and len(split.scenes[q.image_index].objects) >= 3)


def demo_scene() -> Scene:
    """The scene `demo_question` asks about (bundled as `assets/toy/scene.png`)."""
    from .evaluate import test_split

    return test_split().scenes[demo_question().image_index]


def model_card(kind: str, build_record: dict, accuracy_table: str) -> str:
    what, how = WHAT[kind]
    recipe = build_record["recipe"]
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
license: apache-2.0
tags:
- toy
- synthetic
- llava
- {kind}
---

# TOY MODEL: {kind} (trained on synthetic coloured shapes)

**This is a toy.** A tiny LLaVA trained from nothing on a CPU, on computer-generated scenes of 2-4 coloured
shapes (circle / square / triangle in red, green, blue, yellow or purple) and one-word questions about them.
It knows nothing else: no real images, no language beyond these questions. It exists so that
`llava-token-reduction` can show learned behaviour (real answers, real accuracy vs tokens, real projector
tuning) without downloading anything. It is not LLaVA-1.5 and not a model of anything real.

- **This checkpoint:** {what}; {how}.
- **Architecture:** LLaVA-1.5's in miniature. Vision tower: a CLIP ViT (112-px images, 28-px patches, 16 patches
  + CLS, every object inside one patch; 4 layers, width 64) trained contrastively with a 2-layer CLIP text tower
  on scene captions (byte-level CLIP tokenizer); projector: LLaVA's two-layer GELU MLP; language model: a
  {TOY_SHAPE.text_layers}-layer Llama of width {TOY_SHAPE.text_hidden} ({TOY_SHAPE.text_heads} heads) with a
  word-level tokenizer over the task's {len(TASK_WORDS)} words (any other word is `<unk>`).
  {build_record['llava_parameters'] / 1e6:.1f} M parameters (LLaVA), stored in float16 (load with
  `dtype=torch.float32` on a CPU).
- **Training:** CLIP {recipe['clip_steps']} steps x {recipe['clip_batch']} fresh scenes (groups of a scene, its mirror
  image, one shape changed, one colour changed; or of one object alone as each of the three shapes and in another
  colour); LLaVA (vision tower frozen, projector + language model from
  random initialisation) {recipe['llava_steps']} steps x {recipe['llava_batch']} questions of the train split,
  {100 * recipe['background_drop']:.0f}% of them shown with some background patches left out
  ({build_record['train_questions']} questions on {recipe['train_images']} scenes), seed {recipe['seed']},
  `llava-token-reduction toy build` ({build_record['total_seconds']:.0f} s on 2 shared CPU cores).
- **Code:** none in this folder. It ships inside the `llava-token-reduction` package, whose import registers
  the classes with transformers' Auto classes.
- **Prompt:** LLaVA-1.5's format with the question before the image, `USER: {{question}} <image>\\nASSISTANT:`
  (so that every image token can read the question); the processor's chat template writes it. Answers are one
  word (`red`, `triangle`, `yes`, `three`, `left`, ...).

## Held-out accuracy (greedy, exact match; `llava-token-reduction toy eval`)

{accuracy_table}

## Use

```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

import llava_token_reduction  # registers the model types with the Auto classes
from llava_token_reduction.toy import toy_checkpoint

path = toy_checkpoint("{kind}")
model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
processor = AutoProcessor.from_pretrained(path)
question = "{demo_question().text}"
conversation = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=Image.open(toy_checkpoint("{SCENE_FILE}")), text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=10)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def strip_code(directory) -> list[str]:
    """Delete the `*.py` files of a checkpoint directory and every `auto_map` entry of its JSON files (with no
    module left next to them, none names our code any more); returns the names of the deleted files."""
    removed = sorted(path.name for path in Path(directory).rglob("*.py"))
    for path in Path(directory).rglob("*.py"):
        path.unlink()
    strip_foreign_code(directory)
    return removed


def ship(build_dir, assets_dir, accuracy_table: str, tuned=None) -> Path:
    """Copy the checkpoints of `build_dir` (and, from a `toy tune` output `tuned`, its projector and report)."""
    build_dir, assets_dir = Path(build_dir), Path(assets_dir)
    record = json.loads((build_dir / "build.json").read_text())
    assets_dir.mkdir(parents=True, exist_ok=True)
    for kind in SHIPPED:
        target = assets_dir / kind
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(build_dir / kind, target, ignore=shutil.ignore_patterns("__pycache__"))
        strip_code(target)
        (target / "README.md").write_text(model_card(kind, record, accuracy_table))
    shutil.copy(build_dir / "build.json", assets_dir / "build.json")
    (assets_dir / ACCURACY_FILE).write_text(accuracy_table + "\n")
    demo_scene().render().save(assets_dir / SCENE_FILE)
    if tuned:
        (assets_dir / "tuned").mkdir(exist_ok=True)
        shutil.copy(Path(tuned) / "tune" / "projector.safetensors", assets_dir / "tuned" / "projector.safetensors")
        shutil.copy(Path(tuned) / "report.md", assets_dir / "tuned" / "report.md")
    return assets_dir
