"""Widths and depths of the models `bench` builds (presets) or reads off a checkpoint."""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class BenchShape:
    """Widths and depths of a LLaVA-style model: CLIP vision tower, CLIP text tower (for TRIM), two-layer
    projector, Llama language model. `family` is a key of `bench.families.FAMILIES` ("llava": one crop per
    image; "llava_next": anyres crops, the published grid pinpoints); `input_image_size` (width, height), when
    set, is the size the benchmark picture is resized to (LLaVA-NeXT: 672x672, a 2x2 grid, 5 crops)."""

    name: str
    family: str = "llava"
    input_image_size: tuple[int, int] | None = None
    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    projection_dim: int = 768
    clip_text_hidden: int = 768
    clip_text_intermediate: int = 3072
    clip_text_layers: int = 12
    clip_text_heads: int = 12
    clip_text_vocab: int = 49408
    lm_hidden: int = 4096
    lm_intermediate: int = 11008
    lm_layers: int = 32
    lm_heads: int = 32
    lm_kv_heads: int = 32
    lm_vocab: int = 32064

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


PRESETS = {
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 + Vicuna-7B.
    "llava-1.5-7b": BenchShape(name="llava-1.5-7b"),
    # LLaVA-1.5-13B: the same vision tower + Vicuna-13B.
    "llava-1.5-13b": BenchShape(
        name="llava-1.5-13b", lm_hidden=5120, lm_intermediate=13824, lm_layers=40, lm_heads=40, lm_kv_heads=40
    ),
    # LLaVA-NeXT-7B (llava-hf/llava-v1.6-vicuna-7b-hf): the same CLIP ViT-L/14-336 tower on every 336-px crop +
    # Vicuna-7B; a 672x672 picture gives a 2x2 grid, 5 crops, 2928 stock placeholders.
    "llava-next-7b": BenchShape(name="llava-next-7b", family="llava_next", input_image_size=(672, 672)),
    # The demo model's shape (576 patches as LLaVA-1.5, narrow layers): seconds on a CPU, for tests.
    "tiny": BenchShape(
        name="tiny", vision_hidden=128, vision_intermediate=512, vision_layers=6, vision_heads=4, projection_dim=64,
        clip_text_hidden=64, clip_text_intermediate=256, clip_text_layers=2, clip_text_heads=4, clip_text_vocab=600,
        lm_hidden=256, lm_intermediate=768, lm_layers=4, lm_heads=8, lm_kv_heads=8, lm_vocab=300,
    ),
}
# The tiny shape as LLaVA-NeXT on the 672x672 picture (5 crops of 576 patches): seconds on a CPU, for tests.
PRESETS["tiny-next"] = replace(PRESETS["tiny"], name="tiny-next", family="llava_next", input_image_size=(672, 672))
