"""Analytic FLOPs of the language-model prefill and the vision tower (a multiply-add is 2 FLOPs)."""

from .shapes import BenchShape


def lm_prefill_flops(
    tokens: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
    logits_tokens: int = 1, past: int = 0,
) -> dict:
    """FLOPs of a Llama forward over `tokens` new positions after `past` cached ones, by part (`past=0`: the
    prefill; `tokens=1`: one decode step).

    Per layer: the q/k/v/o projections (`k`, `v` narrower under grouped-query attention), the three-matrix
    SwiGLU MLP (gate, up, down), and the attention score (`Q·Kᵀ`) and value (`P·V`) products over the
    causally visible pairs, `tokens·past + tokens·(tokens+1)/2` per head. Plus the LM head on the
    `logits_tokens` last positions (generate computes logits for the last position only). Norms, rotary
    embeddings, softmax and the activation are left out (a few FLOPs per element, under 1% here).
    """
    head_dim = hidden // heads
    kv_width = kv_heads * head_dim
    pairs = tokens * past + tokens * (tokens + 1) // 2
    parts = {
        "qkvo_projections": layers * 2 * tokens * hidden * (2 * hidden + 2 * kv_width),
        "mlp": layers * 2 * tokens * 3 * hidden * intermediate,
        "attention_scores_values": layers * 2 * 2 * heads * head_dim * pairs,
        "lm_head": 2 * logits_tokens * hidden * vocab,
    }
    parts["total"] = sum(parts.values())
    return parts


def shape_prefill_flops(shape: BenchShape, tokens: int, past: int = 0) -> dict:
    """`lm_prefill_flops` of the language model of `shape` over `tokens` positions after `past` cached ones."""
    return lm_prefill_flops(
        tokens, shape.lm_hidden, shape.lm_intermediate, shape.lm_layers, shape.lm_heads, shape.lm_kv_heads,
        shape.lm_vocab, past=past,
    )


def shape_flops(shape: BenchShape, tokens: int) -> int:
    return shape_prefill_flops(shape, tokens)["total"]


def _encoder_layer_flops(tokens: int, hidden: int, intermediate: int) -> int:
    """One CLIP encoder layer over `tokens` positions: the four attention projections, the full `N×N` score and
    value products (sdpa computes every pair, also under CLIP text's causal mask) and the two-matrix MLP."""
    n, d = tokens, hidden
    return 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * intermediate


def vision_tower_flops(shape: BenchShape, layers: int | None = None) -> int:
    """FLOPs of the CLIP vision tower on one image: patch embedding, then `layers` encoder layers over the
    patches and CLS."""
    layers = shape.vision_layers if layers is None else layers
    embed = 2 * shape.patches * 3 * shape.patch_size**2 * shape.vision_hidden
    return embed + layers * _encoder_layer_flops(shape.patches + 1, shape.vision_hidden, shape.vision_intermediate)


def clip_text_tower_flops(shape: BenchShape, tokens: int) -> int:
    """FLOPs of CLIP's text tower (TRIM's question encoder) on one question of `tokens` positions."""
    return shape.clip_text_layers * _encoder_layer_flops(tokens, shape.clip_text_hidden, shape.clip_text_intermediate)


def projector_flops(shape: BenchShape, tokens: int) -> int:
    """FLOPs of LLaVA's two-layer projector (vision width -> LM width -> LM width) on `tokens` image tokens."""
    return 2 * tokens * (shape.vision_hidden * shape.lm_hidden + shape.lm_hidden * shape.lm_hidden)
