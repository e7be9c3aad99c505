"""What the reductions keep on the toy scenes, measured against the scenes' geometry (which we know exactly).

- `trim_sign_report`: for questions that name an object, the share of TRIM's kept patches that lie on that
  object, with `trim_negate_similarity` True (the released sign) and False, next to the object's share of the
  image; plus held-out accuracy for each sign.
- `visionzip_object_report`: the share of VisionZip's dominant patches that lie on any object, against the
  objects' share of the image.
"""

from __future__ import annotations

import numpy as np
import torch

from .scenes import IMAGE_SIZE, object_patches
from .train import prompt_text


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _pixel_inputs(processor, split, questions):
    return processor(
        images=[split.scenes[q.image_index].render() for q in questions],
        text=[prompt_text(processor, q.text) for q in questions], padding=True, return_tensors="pt",
    )


def trim_selection_stats(model, processor, split, questions, patch_size: int) -> dict:
    """Mean kept patches, share of kept patches on the named object, share of questions whose object keeps at
    least one patch, and the named objects' mean share of the image."""
    on_object, on_any, hits, kept_counts, object_share = [], [], [], [], []
    patches = (split.scenes[0].render().size[0] // patch_size) ** 2
    for chunk in _batches(questions, 50):
        inputs = _pixel_inputs(processor, split, chunk)
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], clip_input_ids=inputs["clip_input_ids"],
                clip_attention_mask=inputs["clip_attention_mask"],
            )
        for question, kept in zip(chunk, features.kept_indices):
            scene = split.scenes[question.image_index]
            target = set(object_patches(scene.objects[question.target], patch_size))
            covered = {p for item in scene.objects for p in object_patches(item, patch_size)}
            kept = kept.tolist()
            kept_counts.append(len(kept))
            on_object.append(np.mean([k in target for k in kept]) if kept else 0.0)
            on_any.append(np.mean([k in covered for k in kept]) if kept else 0.0)
            hits.append(any(k in target for k in kept))
            object_share.append(len(target) / patches)
    return {"kept": float(np.mean(kept_counts)), "on_object": float(np.mean(on_object)),
            "on_any": float(np.mean(on_any)),
            "hit": float(np.mean(hits)), "object_share": float(np.mean(object_share))}


def trim_sign_report(root, split, limit: int | None = None, progress: bool = True) -> str:
    from .evaluate import Setting, evaluate, load

    questions = [q for q in split.questions if q.target is not None][:limit]
    lines = ["| trim_negate_similarity | kept patches | kept on the named object | kept on any object "
             "| named object keeps a patch | the named object's share of the image | held-out accuracy |",
             "|---|---|---|---|---|---|---|"]
    for negate in (True, False):
        model, processor = load(f"{root}/trim", trim_negate_similarity=negate)
        stats = trim_selection_stats(model, processor, split, questions, model.config.vision_config.patch_size)
        label = "TRIM adaptive" + ("" if negate else ", sign False")
        accuracy = evaluate([Setting(label, "trim", {"trim_negate_similarity": negate})], root=root, split=split,
                            progress=progress)[0].accuracy
        lines.append(f"| {negate}{' (released)' if negate else ''} | {stats['kept']:.1f} "
                     f"| {100 * stats['on_object']:.0f}% | {100 * stats['on_any']:.0f}% | {100 * stats['hit']:.0f}% "
                     f"| {100 * stats['object_share']:.0f}% "
                     f"| {100 * accuracy:.1f}% |")
    lines.append(f"\n{len(questions)} held-out questions that name an object (colour, shape, exists-yes, side).")
    return "\n".join(lines)


def visionzip_object_report(root, split, budgets=((2, 1), (3, 1), (6, 2))) -> str:
    from .evaluate import load

    lines = ["| budget | dominant patches on an object | objects' share of the image |", "|---|---|---|"]
    for dominant, contextual in budgets:
        model, processor = load(f"{root}/visionzip", dominant_tokens=dominant, contextual_tokens=contextual)
        patch_size = model.config.vision_config.patch_size
        on_object, share = [], []
        for start in range(0, len(split.scenes), 50):
            scenes = split.scenes[start:start + 50]
            pixels = processor.image_processor([s.render() for s in scenes], return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                _, cls_attention, _ = model.model.get_visionzip_layer_outputs(pixels)
            for scene, kept in zip(scenes, _dominant_patches(cls_attention, dominant)):
                covered = {p for item in scene.objects for p in object_patches(item, patch_size)}
                on_object.append(np.mean([k in covered for k in kept]) if kept else 0.0)
                share.append(len(covered) / (IMAGE_SIZE // patch_size) ** 2)
        lines.append(f"| {dominant}+{contextual} | {100 * np.mean(on_object):.0f}% | {100 * np.mean(share):.0f}% |")
    return "\n".join(lines)


def _dominant_patches(cls_attention, dominant: int) -> list[list[int]]:
    """Patch indices (0-based over the patches, CLS excluded) of the `dominant - 1` patches with the largest CLS
    attention (`cls_attention` `[B, N]`, CLS first), as VisionZip keeps them (docs/visionzip.md §2)."""
    return [sorted(torch.topk(row[1:], dominant - 1).indices.tolist()) for row in cls_attention]
