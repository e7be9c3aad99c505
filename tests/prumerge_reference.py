"""An independent reference of PruMerge / PruMerge+ written from ALGORITHMS.md §3 and docs/prumerge.md, in numpy
float64 with explicit loops (the released code's structure: for each kept token, the others gathered before it,
after it, then the not-kept ones), from an eager vision tower's hidden states. Nothing here imports the code
under test."""

import numpy as np
import torch


def last_layer_inputs(model, pixel_values):
    """`(hs[-2], hs[feature layer], params)` from the model's vision tower run in eager attention, as numpy."""
    tower = model.model.vision_tower
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            hidden = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
    finally:
        tower.config._attn_implementation = previous
    layer = tower.encoder.layers[-1]
    params = {name: value.detach().double().numpy() for name, value in (
        ("ln_w", layer.layer_norm1.weight), ("ln_b", layer.layer_norm1.bias),
        ("q_w", layer.self_attn.q_proj.weight), ("q_b", layer.self_attn.q_proj.bias),
        ("k_w", layer.self_attn.k_proj.weight), ("k_b", layer.self_attn.k_proj.bias))}
    params["eps"] = layer.layer_norm1.eps
    feature = hidden[model.config.vision_feature_layer]
    return hidden[-2].double().numpy(), feature.double().numpy(), params


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def reference_prumerge(last_input, features, params, plus=False, multiplier=1.5, coupled=False, low=None,
                       high=None):
    """Per image `(tokens [M (+1), D], kept [M], scores [N_p])` for a batch `[B, N, D]`."""
    batch, tokens, width = last_input.shape
    patches = tokens - 1
    scores = []
    keys_all = []
    for b in range(batch):
        normed = _layer_norm(last_input[b], params["ln_w"], params["ln_b"], params["eps"])
        q = normed @ params["q_w"].T + params["q_b"]
        k = normed @ params["k_w"].T + params["k_b"]
        logits = q[0] @ k.T / np.sqrt(width)  # the CLS row over all N keys, heads not split
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        scores.append(probabilities[1:])  # CLS column dropped after the softmax
        keys_all.append(k[1:])

    def outlier_ratio(values):
        q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
        return np.sum(values > q3 + multiplier * (q3 - q1)) / len(values)

    pooled = outlier_ratio(np.concatenate(scores)) if coupled else None
    results = []
    for b in range(batch):
        ratio = pooled if coupled else outlier_ratio(scores[b])
        count = int(patches * ratio)
        count = max(count, low or 0)
        count = min(count, patches if high is None else high)
        order = sorted(range(patches), key=lambda j: -scores[b][j])  # descending attention
        kept = order[:count]
        if plus:
            if count == 0:
                sample = [0]
            else:
                stride = max(1, int(int(1 / (count / patches)) / 3))
                sample = list(range(0, patches - 1, stride))  # 575 for 576 patches
            kept = kept + [p for p in sample if p not in kept]
        rest = [j for j in range(patches) if j not in kept]
        x, a, k = features[b][1:], scores[b], keys_all[b]
        unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
        out = []
        for i, index in enumerate(kept):
            candidates = kept[:i] + kept[i + 1:] + rest
            similarity = np.array([unit[index] @ unit[j] for j in candidates])
            nearest = [candidates[c] for c in np.argsort(-similarity, kind="stable")[:min(32, patches - 1)]]
            out.append(x[index] + sum(a[j] * x[j] for j in nearest))
        if rest:
            out.append(sum(a[j] * x[j] for j in rest))
        results.append((np.stack(out), kept, scores[b]))
    return results


def reference_features(model, inputs):
    """Per image, the projected PruMerge (+) tokens of a PruMerge model on the processor's `inputs`, with the
    model's settings, in the reference's order (kept tokens by descending attention, then the extra token)."""
    config = model.config
    last_input, features, params = last_layer_inputs(model, inputs["pixel_values"])
    results = reference_prumerge(last_input, features, params, plus=config.prumerge_plus,
                                 multiplier=config.prumerge_iqr_multiplier, coupled=config.prumerge_batch_coupled,
                                 low=config.prumerge_min_tokens, high=config.prumerge_max_tokens)
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        return [projector(torch.from_numpy(tokens).float()) for tokens, _, _ in results]
