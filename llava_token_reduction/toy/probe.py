"""Does the toy CLIP see shapes and sides? Two checks that take a minute, before any LLaVA training.

- `retrieval_by_member`: on held-out contrastive groups (a scene, its mirror image, one shape changed, one
  colour changed), how often each member's own caption scores highest among the group's four (chance 25%).
  The mirror tells whether the tower knows left from right, the shape-changed member whether it knows shapes.
- `shape_probe`: a linear classifier trained on the frozen tower's LLaVA features (the layer LLaVA reads,
  `vision_feature_layer`) of the patches around each object's centre, tested on other scenes' objects: what
  a projector and a language model could read off the features at best with one linear map.
"""

from __future__ import annotations

import numpy as np
import torch

from .scenes import COLORS, SHAPES, contrastive_group, make_scene
from .train import CLIP_CHECK_SEED, TOY_SHAPE, _clip_inputs, build_clip_processor


MEMBERS = ("scene", "mirror", "shape changed", "colour changed")
PROBE_TRAIN_SEED, PROBE_TEST_SEED = 5, 6  # scenes of neither split nor CLIP training


def retrieval_by_member(model, groups: int = 100) -> dict[str, float]:
    """Caption retrieval within each group, per member (see the module docstring) and overall ("all")."""
    processor = build_clip_processor()
    rng = np.random.default_rng(CLIP_CHECK_SEED)
    hits = []
    with torch.no_grad():
        for index in range(groups):
            logits = model(**_clip_inputs(processor, contrastive_group(rng, CLIP_CHECK_SEED * 7_000_001 + index)))
            hits.append((logits.logits_per_image.argmax(dim=1) == torch.arange(4)).tolist())
    hits = np.array(hits, dtype=float)
    return {"all": float(hits.mean()), **{name: float(hits[:, i].mean()) for i, name in enumerate(MEMBERS)}}


def object_features(vision_model, seed: int, scenes: int, layer: int = -2, neighbourhood: int = 1):
    """For every object of `scenes` fresh scenes: the tower's `layer` features of the (2n+1)^2 patches centred
    on the object's centre patch, concatenated (zeros off the image); its shape and colour indices."""
    processor = build_clip_processor()
    grid = TOY_SHAPE.image_size // TOY_SHAPE.patch_size
    rng = np.random.default_rng(seed)
    drawn = [make_scene(rng, noise_seed=seed * 1_000_003 + index) for index in range(scenes)]
    features, shapes, colors = [], [], []
    with torch.no_grad():
        for start in range(0, scenes, 100):
            chunk = drawn[start:start + 100]
            pixels = processor.image_processor(images=[s.render() for s in chunk], return_tensors="pt")["pixel_values"]
            hidden = vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
            padded = torch.nn.functional.pad(hidden.unflatten(1, (grid, grid)),
                                             (0, 0, neighbourhood, neighbourhood, neighbourhood, neighbourhood))
            size = 2 * neighbourhood + 1
            for row, scene in enumerate(chunk):
                for item in scene.objects:
                    top, left = item.y // TOY_SHAPE.patch_size, item.x // TOY_SHAPE.patch_size
                    features.append(padded[row, top:top + size, left:left + size].flatten())
                    shapes.append(SHAPES.index(item.shape))
                    colors.append(list(COLORS).index(item.color))
    return torch.stack(features), torch.tensor(shapes), torch.tensor(colors)


def linear_probe(train_x, train_y, test_x, test_y, classes: int, steps: int = 300, seed: int = 0) -> float:
    """Test accuracy of a softmax classifier (standardised inputs, Adam, a little weight decay)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(train_x.shape[1], classes)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.01)
        layer.bias.zero_()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(layer((train_x - mean) / std), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((layer((test_x - mean) / std).argmax(1) == test_y).float().mean())


def shape_probe(vision_model, train_scenes: int = 1500, test_scenes: int = 300, neighbourhood: int = 1) -> dict:
    """Linear-probe accuracy for shape (chance 33%) and colour (20%) from the features around each object."""
    train_x, train_shape, train_color = object_features(vision_model, PROBE_TRAIN_SEED, train_scenes,
                                                        neighbourhood=neighbourhood)
    test_x, test_shape, test_color = object_features(vision_model, PROBE_TEST_SEED, test_scenes,
                                                     neighbourhood=neighbourhood)
    return {"shape": linear_probe(train_x, train_shape, test_x, test_shape, len(SHAPES)),
            "colour": linear_probe(train_x, train_color, test_x, test_color, len(COLORS))}


def clip_report(model, groups: int = 100, probe_scenes: int = 1500) -> str:
    """Both checks as a few lines of text (`toy clip-check`); the probes train on `probe_scenes` scenes' objects
    and test on a fifth as many other scenes'."""
    retrieval = retrieval_by_member(model, groups)
    sizes = {"train_scenes": probe_scenes, "test_scenes": max(1, probe_scenes // 5)}
    probe = shape_probe(model.vision_model, **sizes)
    centre = shape_probe(model.vision_model, neighbourhood=0, **sizes)
    lines = [f"caption retrieval within {groups} held-out groups of four (chance 25%): {100 * retrieval['all']:.1f}%"]
    lines += [f"  {name}: {100 * retrieval[name]:.0f}%" for name in MEMBERS]
    lines.append(f"linear probe, 3x3 patches around each object (chance 33% / 20%): shape {100 * probe['shape']:.1f}%, "
                 f"colour {100 * probe['colour']:.1f}%")
    lines.append(f"linear probe, the centre patch alone: shape {100 * centre['shape']:.1f}%, "
                 f"colour {100 * centre['colour']:.1f}%")
    return "\n".join(lines)
