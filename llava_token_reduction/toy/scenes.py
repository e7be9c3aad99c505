"""The toy task: scenes of a few coloured shapes, one-word questions about them, and captions.

Everything is a pure function of a seed, so the train and test splits are the same on every machine.
Geometry follows LLaVA-1.5 in miniature: 112-pixel images cut into 28-pixel patches (a 4x4 grid, 16 patches
plus CLS), and every object inside one patch, so a reduction that drops the wrong patch loses the answer. (The
first four passes used 14-pixel patches, 64 per image, with objects across several; a vision tower trained for
minutes then told shapes apart from a patch only 55-65% of the time, and the language model could not find the
object a question names: docs/toy_model.md.)

A scene holds 2-4 objects with distinct (colour, shape) pairs, on a light background with a little noise. No
object straddles the vertical centre line (it lies in one cell), so "left or right" always has an answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw


IMAGE_SIZE = 112
CELL = 28  # the toy LLaVA's patch: every object lies inside one cell of this grid
GRID = IMAGE_SIZE // CELL
MIN_RADIUS, MAX_RADIUS = 9, 12  # half an object's width: 19-25 px, so that it fits in its cell
SINGLE_OBJECT_GROUPS = 0.5  # the share of CLIP's contrastive groups that show one object (`contrastive_group`)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
QUESTION_KINDS = ("color", "shape", "exists", "count", "side")
# Chance accuracy of a guesser that knows the answer set of each kind (but not the image).
CHANCE = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "exists": 1 / 2, "count": 1 / 3, "side": 1 / 2}
# Seeds of the splits: images never repeat between them.
TRAIN_SEED = 1
TEST_SEED = 2


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    x: int  # centre, pixels
    y: int
    radius: int  # half the width

    @property
    def side(self) -> str:
        return "left" if self.x < IMAGE_SIZE // 2 else "right"

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]
    noise_seed: int

    def caption(self) -> str:
        """The objects from left to right, e.g. 'red circle, blue square, green triangle' (short enough for
        CLIP's 77 tokens with a byte-level tokenizer)."""
        return ", ".join(item.name for item in sorted(self.objects, key=lambda item: item.x))

    def render(self) -> Image.Image:
        rng = np.random.default_rng(self.noise_seed)
        pixels = np.array(self.background, dtype=np.float32) + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for item in self.objects:
            x, y, r = item.x, item.y, item.radius
            fill = COLORS[item.color]
            if item.shape == "circle":
                draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
            elif item.shape == "square":
                draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
            else:
                draw.polygon(((x, y - r), (x - r, y + r), (x + r, y + r)), fill=fill)
        return image


def mirrored(scene: Scene) -> Scene:
    """The scene flipped left to right (same noise): every side swaps and the caption's order reverses. Pixel
    column i goes to IMAGE_SIZE - 1 - i, so an object stays inside its (mirrored) cell."""
    return replace(scene, objects=tuple(replace(o, x=IMAGE_SIZE - 1 - o.x) for o in scene.objects))


def changed_attribute(scene: Scene, rng: np.random.Generator, attribute: str) -> Scene | None:
    """The scene with one object's `attribute` ("shape" or "color") changed so that the (colour, shape) pairs
    stay distinct, or None if no object can change."""
    present = {(o.color, o.shape) for o in scene.objects}
    options = []
    for index, item in enumerate(scene.objects):
        for value in (SHAPES if attribute == "shape" else tuple(COLORS)):
            pair = (item.color, value) if attribute == "shape" else (value, item.shape)
            if value != getattr(item, attribute) and pair not in present:
                options.append((index, value))
    if not options:
        return None
    index, value = options[rng.integers(len(options))]
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **{attribute: value})
    return replace(scene, objects=tuple(objects))


def contrastive_group(rng: np.random.Generator, noise_seed: int) -> list[Scene]:
    """Four scenes for contrastive training whose captions only shapes (and left-to-right order) tell apart.

    Half the groups are a scene and three hard negatives: mirrored, one shape changed, one colour changed
    (random scenes in a batch differ mostly by their colours, so a CLIP trained on them alone learns colours
    and little else). The other half are one object alone, in the same place, as each of the three shapes and
    in another colour: the tower then has to tell the shape from the one patch the object is in, which is
    what the language model reads (`SINGLE_OBJECT_GROUPS`)."""
    scene = make_scene(rng, noise_seed)
    if rng.random() < SINGLE_OBJECT_GROUPS:
        item = scene.objects[0]
        others = [shape for shape in SHAPES if shape != item.shape]
        colors = [color for color in COLORS if color != item.color]
        members = [item, *(replace(item, shape=shape) for shape in others),
                   replace(item, color=colors[rng.integers(len(colors))])]
        return [replace(scene, objects=(member,)) for member in members]
    group = [scene, mirrored(scene)]
    for attribute in ("shape", "color"):
        group.append(changed_attribute(scene, rng, attribute) or make_scene(rng, noise_seed))
    return group


@dataclass(frozen=True)
class Question:
    image_index: int
    kind: str
    text: str
    answer: str
    target: int | None = None  # index in the scene's objects of the object the question names, if any


def object_patches(item: SceneObject, patch_size: int = CELL) -> list[int]:
    """Raster indices of the patches (of a `patch_size` grid over the image) that the object's box touches."""
    grid = IMAGE_SIZE // patch_size
    low = lambda v: max(0, (v - item.radius) // patch_size)  # noqa: E731
    high = lambda v: min(grid - 1, (v + item.radius) // patch_size)  # noqa: E731
    rows, cols = range(low(item.y), high(item.y) + 1), range(low(item.x), high(item.x) + 1)
    return [row * grid + col for row in rows for col in cols]


def make_scene(rng: np.random.Generator, noise_seed: int) -> Scene:
    """2-4 objects with distinct (colour, shape) pairs, each inside its own cell of the patch grid (a 4x4 grid
    of 28-px cells, the toy LLaVA's patches), 19-25 px across, anywhere in its cell; no two share a centre
    column, so the caption's left-to-right order is never a tie."""
    count = int(rng.integers(2, 5))
    pairs = [(color, shape) for color in COLORS for shape in SHAPES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    objects: list[SceneObject] = []
    for index, cell in zip(chosen, cells):
        color, shape = pairs[index]
        row, col = divmod(int(cell), GRID)
        while True:  # rejection sampling on the centre column only: nearly always the first draw
            radius = int(rng.integers(MIN_RADIUS, MAX_RADIUS + 1))
            x = int(rng.integers(col * CELL + radius, (col + 1) * CELL - radius))
            if all(x != o.x for o in objects):
                break
        y = int(rng.integers(row * CELL + radius, (row + 1) * CELL - radius))
        objects.append(SceneObject(color, shape, x, y, radius))
    gray = int(rng.integers(200, 250))
    return Scene(tuple(objects), (gray, gray, gray), noise_seed)


def make_questions(scene: Scene, image_index: int, rng: np.random.Generator, per_image: int) -> list[Question]:
    """`per_image` questions of different kinds about `scene`, drawn among the kinds that have an answer."""
    objects = scene.objects
    candidates: list[tuple] = []  # (kind, text, answer, target object index or None)
    shape_counts = {shape: sum(o.shape == shape for o in objects) for shape in SHAPES}
    color_counts = {color: sum(o.color == color for o in objects) for color in COLORS}
    unique_shapes = [o for o in objects if shape_counts[o.shape] == 1]
    unique_colors = [o for o in objects if color_counts[o.color] == 1]
    if unique_shapes:
        item = unique_shapes[rng.integers(len(unique_shapes))]
        candidates.append(("color", f"What color is the {item.shape}?", item.color, objects.index(item)))
    if unique_colors:
        item = unique_colors[rng.integers(len(unique_colors))]
        candidates.append(("shape", f"What shape is the {item.color} object?", item.shape, objects.index(item)))
    if rng.random() < 0.5:
        item = objects[rng.integers(len(objects))]
        candidates.append(("exists", f"Is there a {item.name}?", "yes", objects.index(item)))
    else:
        present = {(o.color, o.shape) for o in objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = absent[rng.integers(len(absent))]
        candidates.append(("exists", f"Is there a {color} {shape}?", "no", None))
    candidates.append(("count", "How many shapes are there?", NUMBER_WORDS[len(objects)], None))
    item = objects[rng.integers(len(objects))]
    candidates.append(("side", f"Is the {item.name} on the left or right?", item.side, objects.index(item)))
    picks = rng.choice(len(candidates), size=min(per_image, len(candidates)), replace=False)
    return [Question(image_index, *candidates[i]) for i in sorted(picks)]


@dataclass(frozen=True)
class Split:
    scenes: tuple[Scene, ...]
    questions: tuple[Question, ...]

    def images(self) -> list[Image.Image]:
        return [scene.render() for scene in self.scenes]


def make_split(seed: int, images: int, questions_per_image: int = 2) -> Split:
    """`images` scenes and their questions, a pure function of (`seed`, `images`, `questions_per_image`)."""
    rng = np.random.default_rng(seed)
    scenes, questions = [], []
    for index in range(images):
        scene = make_scene(rng, noise_seed=seed * 1_000_003 + index)
        scenes.append(scene)
        questions += make_questions(scene, index, rng, questions_per_image)
    return Split(tuple(scenes), tuple(questions))


def chance_accuracy(questions) -> float:
    return float(np.mean([CHANCE[q.kind] for q in questions]))
