"""An independent reference of TRIM written from ALGORITHMS.md §2 (docs/trim.md): numpy and plain loops only
(float64 softmax, numpy's default linear percentiles, a stable descending sort for the top-k), its inputs taken by
the stock route (the tower's `output_hidden_states`, no hooks). Nothing here calls the code under test, so a
shared bug cannot hide."""

import numpy as np
import torch


def reference_trim(P, Z, t, negate=True, multiplier=1.5, coupled=False, low=None, high=None, mean_token=True):
    """ALGORITHMS.md §2.2-§2.5, one image at a time. P [B, N_p, D], Z [B, N_p, E], t [B, E] (numpy).
    Returns (tokens per image, kept indices per image, scores [B, N_p])."""
    P, Z, t = (np.asarray(a, dtype=np.float64) for a in (P, Z, t))
    batch, patches = P.shape[:2]
    sign = -1.0 if negate else 1.0
    scores = np.zeros((batch, patches))
    for b in range(batch):
        logits = [sign * sum(Z[b, j, e] * t[b, e] for e in range(Z.shape[2])) for j in range(patches)]
        top = max(logits)
        weights = [np.exp(value - top) for value in logits]
        scores[b] = [w / sum(weights) for w in weights]

    def outliers(values):
        q1, q3 = np.percentile(values, [25, 75])  # numpy default: linear interpolation
        fence = q3 + multiplier * (q3 - q1)
        return sum(1 for v in values if v > fence)

    if coupled:
        flat = scores.reshape(-1)
        counts = [int(patches * outliers(flat) / len(flat))] * batch
    else:
        counts = [int(patches * outliers(scores[b]) / patches) for b in range(batch)]

    tokens, kept = [], []
    for b in range(batch):
        k = min(max(counts[b], low or 0), high if high is not None else patches)
        if k == 0 and not mean_token:
            k = 1
        order = sorted(range(patches), key=lambda j: -scores[b, j])  # stable: ties keep raster order
        selected = sorted(order[:k])
        rows = [P[b, j] for j in selected]
        rest = [j for j in range(patches) if j not in selected]
        if mean_token and rest:
            rows.append(np.mean([P[b, j] for j in rest], axis=0))
        tokens.append(np.array(rows).reshape(len(rows), P.shape[2]))
        kept.append(selected)
    return tokens, kept, scores


def reference_features(model, inputs):
    """Per image, the projected TRIM tokens `[k (+1), hidden]` and the kept patch indices, of a TRIM model on the
    processor's `inputs` (`pixel_values`, `clip_input_ids`, `clip_attention_mask`), with the model's settings."""
    config = model.config
    inner = model.model
    with torch.no_grad():
        P = inner.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        Z = inner.visual_projection(inner.vision_tower.post_layernorm(P))
        t = inner.clip_text_model(input_ids=inputs["clip_input_ids"],
                                  attention_mask=inputs.get("clip_attention_mask")).text_embeds
    tokens, kept, _ = reference_trim(
        P.numpy(), Z.numpy(), t.numpy(), negate=config.trim_negate_similarity, multiplier=config.trim_iqr_multiplier,
        coupled=config.trim_batch_coupled, low=config.trim_min_tokens, high=config.trim_max_tokens,
        mean_token=config.trim_append_mean_token,
    )
    with torch.no_grad():
        projected = [inner.multi_modal_projector(torch.from_numpy(rows).float()) for rows in tokens]
    return projected, kept
