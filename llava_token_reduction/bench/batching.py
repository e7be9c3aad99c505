"""Throughput under batching: every row at several batch sizes, next to the released way (batch 1, one image
at a time) and to stock LLaVA at the same batch size, with the ratios the FLOPs predict; padding and memory.

A cell is one row at one batch size: one `generate` call on `B` different pictures (`batch_images`), one prompt
each. Its figures:

- images/s = `B` / the call's wall time (vision, reduction, prefill and every decode step); TTFT = start of
  the call to the first LM-head output, when every image of the batch has its first token.
- padding = the share of the language model's prefill positions that are left padding (`1 - Σ n_r / (B·L)`,
  from the attention mask the language model got). Fixed budgets (stock, VisionZip) give equal rows; an adaptive
  count (TRIM) gives rows of different lengths, padded to the longest, and the padding is computed like the rest.
- FLOPs of the call (analytic, `flops`): the vision tower over the crops and layers that ran (counted by hooks:
  LLaVA-NeXT runs several crops per image, a method reading layer -2 one layer fewer than stock), CLIP text
  tower over the columns some row attends, the projector on the tokens it mapped, the LM prefill over all `B·L`
  positions (padding included: sdpa computes it) and every decode step over the padded context. `useful` leaves
  the padding out.
- Predicted ratios: over the released way, FLOPs per image at batch 1 / at batch `B` (batching saves no FLOPs:
  1.00×, less with padding; a measured gain above it is hardware efficiency); over stock at the same `B`, stock
  FLOPs / the row's FLOPs.
- Memory: the weights (bytes of the model's distinct parameters and buffers), the KV cache after the prefill
  (bytes of the cache tensors), and the peak above the level before the call (activations + KV cache; on a CPU
  the process RSS sampled every ms, allocator slack included; on a GPU `max_memory_allocated`), from the first
  (warm-up) run of the cell.
"""

from .flops import clip_text_tower_flops, projector_flops, shape_prefill_flops, vision_tower_flops


def weights_bytes(model) -> int:
    """Bytes of the distinct parameters and buffers of `model` (shared modules counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.nbytes
    return total


def text_tokens_per_row(model, inputs: dict) -> list[int]:
    """Attended prompt tokens of each row that are not image placeholders."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    text = ids != model.config.image_token_id
    if mask is not None:
        text &= mask.bool()
    return [int(n) for n in text.sum(dim=1)]


def clip_columns(inputs: dict) -> int:
    """CLIP text positions some row attends (the text tower runs over these only); 0 without CLIP inputs."""
    mask = inputs.get("clip_attention_mask")
    return 0 if mask is None else int((mask.sum(dim=0) > 0).sum())


def generate_flops(shape, row_tokens: list[int], image_tokens: list[int], new_tokens: int, text_columns: int = 0,
                   padded: bool = True, vision_layers: int | None = None, vision_crops: int | None = None,
                   projected_tokens: int | None = None) -> int:
    """Analytic FLOPs of one batched `generate` call: `row_tokens[r]` prefill positions of row `r`, of which
    `image_tokens[r]` are image tokens, `new_tokens` generated (the prefill gives the first, each later one is a
    decode step). With `padded`, every row is computed at the longest row's length, as it runs; without, each
    row at its own (the useful work).

    The vision side as it ran: `vision_crops` crops through the tower (default one per row; LLaVA-NeXT has
    several per image), each through `vision_layers` encoder layers (default all of them; a method reading
    layer -2 runs one fewer), and the projector on `projected_tokens` tokens (default the image tokens; stock
    LLaVA-NeXT projects every crop's patches and adds its newline tokens after the projector)."""
    longest = max(row_tokens)
    crops = len(row_tokens) if vision_crops is None else vision_crops
    projected = sum(image_tokens) if projected_tokens is None else projected_tokens
    total = crops * vision_tower_flops(shape, vision_layers) + projector_flops(shape, projected)
    for tokens in row_tokens:
        length = longest if padded else tokens
        if text_columns:
            total += clip_text_tower_flops(shape, text_columns)
        total += shape_prefill_flops(shape, length)["total"]
        total += sum(shape_prefill_flops(shape, 1, past=length + step)["total"] for step in range(new_tokens - 1))
    return total


def cell_figures(workload, name: str, batch_inputs: dict, result: dict) -> dict:
    """What one measured cell contributes besides its times: tokens, padding, FLOPs, memory."""
    model = workload.models[name]
    rows = result["prefill_row_tokens"]
    batch = len(rows)
    text = text_tokens_per_row(model, batch_inputs)
    kept = [tokens - words for tokens, words in zip(rows, text)]
    columns = clip_columns(batch_inputs)
    vision = {"vision_layers": result["vision_layers_run"], "vision_crops": result["vision_crops"],
              "projected_tokens": result["projected_tokens"]}
    flops = generate_flops(workload.shape, rows, kept, result["new_tokens"], columns, **vision)
    useful = generate_flops(workload.shape, rows, kept, result["new_tokens"], columns, padded=False, **vision)
    return {
        "batch": batch,
        "image_tokens_per_image": kept,
        "vision_crops_per_image": result["vision_crops"] / batch,
        "vision_layers_run": result["vision_layers_run"],
        "prefill_positions": result["prefill_tokens"] * batch,
        "padding_fraction": 1 - sum(rows) / (result["prefill_tokens"] * batch),
        "generate_flops": flops,
        "generate_flops_useful": useful,
        "flops_per_image": flops / batch,
        "kv_cache_bytes": result["kv_cache_bytes"],
        "weights_bytes": weights_bytes(model),
    }


def batch_rows(cells: dict, summary) -> list[dict]:
    """The batch table from `cells` {(row, batch): {"runs": [...], "peak_memory_bytes": ..., **cell_figures}}:
    medians over the runs, and every ratio from these medians (one run of the benchmark)."""
    out = []
    for (name, batch), cell in cells.items():
        runs = cell["runs"]
        row = {key: value for key, value in cell.items() if key != "runs"}
        row["method"] = name
        row["images_per_s"] = summary([1000 * batch / r["total_ms"] for r in runs])
        for metric in ("ttft_ms", "prefill_ms", "total_ms", "decode_ms_per_token", "vision_ms"):
            row[metric] = summary([r[metric] for r in runs])
        out.append(row)
    by_key = {(row["method"], row["batch"]): row for row in out}
    for row in out:
        released = by_key.get((row["method"], 1))
        if released is not None:
            row["vs_released_measured"] = row["images_per_s"]["median"] / released["images_per_s"]["median"]
            row["vs_released_predicted"] = released["flops_per_image"] / row["flops_per_image"]
        stock = by_key.get(("stock", row["batch"]))
        if stock is not None:
            row["vs_stock_measured"] = row["images_per_s"]["median"] / stock["images_per_s"]["median"]
            row["vs_stock_predicted"] = stock["flops_per_image"] / row["flops_per_image"]
            row["ttft_vs_stock"] = stock["ttft_ms"]["median"] / row["ttft_ms"]["median"]
    return out
