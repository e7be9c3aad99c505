"""Independent references of VisionZip (ALGORITHMS.md §1.2, one image at a time, with plain loops over an *eager*
copy of the vision tower's attention maps) and of the LLaVA-NeXT layout (§1.5, docs/llava_next.md), for the model
tests of both families. Nothing here calls the code under test."""

import copy
import math

import torch
import torch.nn.functional as F
from transformers import CLIPVisionModel


def eager_tower_outputs(model, pixel_values, **kwargs):
    """Run an eager copy of the model's vision tower with every attention map and hidden state."""
    config = copy.deepcopy(model.model.vision_tower.config)
    config._attn_implementation = "eager"
    tower = CLIPVisionModel(config).eval()
    tower.load_state_dict(model.model.vision_tower.state_dict())
    with torch.no_grad():
        outputs = tower(pixel_values, output_attentions=True, output_hidden_states=True, **kwargs)
    assert len(outputs.attentions) == len(tower.encoder.layers) and outputs.attentions[0] is not None
    return tower, outputs


def reference_visionzip(tower, outputs, image, layer, dominant, contextual):
    """VisionZip for image `image`, following ALGORITHMS.md §1.2 step by step.

    Returns the reduced `[dominant + contextual, D]` tokens and the smallest decision margin (score gap at
    the top-k boundary, similarity gap between the best and second-best target), so the test can check that
    its data does not sit on a near-tie where two correct implementations could legitimately differ."""
    num_layers = len(tower.encoder.layers)
    index = layer % num_layers  # layers[index] produces hidden_states[index + 1]
    block = tower.encoder.layers[index]
    x = outputs.hidden_states[index + 1][image]  # [N, D], CLS at 0
    layer_input = outputs.hidden_states[index][image]
    attention = outputs.attentions[index][image]  # [H, N, N]
    heads, tokens = attention.shape[0], x.shape[0]
    with torch.no_grad():
        keys = block.self_attn.k_proj(block.layer_norm1(layer_input))  # [N, H*d], bias included
    head_keys = keys.view(tokens, heads, -1)
    mean_keys = [sum(head_keys[j, h] for h in range(heads)) / heads for j in range(tokens)]

    margins = []
    scores = {j: sum(float(attention[h, 0, j]) for h in range(heads)) for j in range(1, tokens)}
    ranked = sorted(scores, key=lambda j: -scores[j])
    top = ranked[: dominant - 1]
    if 0 < dominant - 1 < len(ranked):
        margins.append(scores[ranked[dominant - 2]] - scores[ranked[dominant - 1]])
    keep = sorted([0] + top)
    rest = [j for j in range(tokens) if j not in keep]

    contextual_rows = []
    if contextual > 0:
        unit = [mean_keys[j] / mean_keys[j].norm() for j in rest]
        step = max(1, len(rest) // contextual)
        targets = [t * step for t in range(contextual)]
        members = {t: [] for t in targets}
        for s in range(len(rest)):
            if s in members:
                continue
            similarities = [float(unit[s] @ unit[t]) for t in targets]
            best = max(similarities)
            owner = targets[similarities.index(best)]  # first maximum
            members[owner].append(s)
            if len(similarities) > 1:
                margins.append(best - sorted(similarities)[-2])
        for t in targets:
            row = x[rest[t]].clone()
            if members[t]:
                row = row + sum(x[rest[s]] for s in members[t]) / len(members[t])
            contextual_rows.append(row)
    reduced = torch.stack([x[j] for j in keep] + contextual_rows)
    return reduced, min(margins, default=math.inf)


def reference_projection(model, reduced):
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        return projector.linear_2(F.gelu(projector.linear_1(reduced)))


def reference_layout(crop_ids, kept_patches, grid, side):
    """ALGORITHMS.md §1.5, literally. `crop_ids[k]` is crop k's list `[CLS, dominant..., contextual...]` of token
    ids; `kept_patches[k]` the patch index (row-major in the crop, `side` patches a row) of each dominant token."""
    rows, cols = grid
    dominant = len(kept_patches[0]) + 1
    out = list(crop_ids[0])  # 1. the base crop as it is
    canvas = {}  # 2. grid crops' non-CLS dominant tokens on the whole canvas
    for j in range(rows * cols):
        cell_row, cell_col = j // cols, j % cols
        for token, patch in zip(crop_ids[1 + j][1:dominant], kept_patches[1 + j]):
            r, c = patch // side, patch % side
            canvas[(cell_row * side + r, cell_col * side + c)] = token
    for canvas_row in range(rows * side):
        for canvas_col in range(cols * side):
            if (canvas_row, canvas_col) in canvas:
                out.append(canvas[(canvas_row, canvas_col)])
    for j in range(rows * cols):  # 3. grid CLS tokens in crop order
        out.append(crop_ids[1 + j][0])
    for j in range(rows * cols):  # 4. grid contextual tokens, crop-major
        out.extend(crop_ids[1 + j][dominant:])
    return out


def reference_features(model, inputs):
    """Per image, the projected VisionZip tokens `[dominant + contextual, hidden]` of a LLaVA-1.5 VisionZip model on
    the processor's `inputs`, with the model's budget and layer."""
    config = model.config
    tower, outputs = eager_tower_outputs(model, inputs["pixel_values"])
    return [
        reference_projection(model, reference_visionzip(tower, outputs, image, config.visionzip_layer,
                                                        config.dominant_tokens, config.contextual_tokens)[0])
        for image in range(len(inputs["pixel_values"]))
    ]
