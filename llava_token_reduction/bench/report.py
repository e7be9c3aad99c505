"""The report of a benchmark run: a markdown table, a PNG plot and the JSON, written side by side."""

import json
from pathlib import Path

from .. import methods as registry
from .families import FAMILIES


def _mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def _ms(summary: dict, digits: int = 0) -> str:
    if summary["median"] is None:
        return "–"
    if len(summary["values"]) > 1:
        return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}–{summary['max']:.{digits}f})"
    return f"{summary['median']:.{digits}f}"


def render_markdown(report: dict) -> str:
    shape = report["shape"]
    machine = report["machine"]
    rows = report["methods"]
    family = FAMILIES[report.get("family", "llava")]
    picture = report.get("input_image_size")
    crops = rows[0]["vision_crops"] if rows and "vision_crops" in rows[0] else 1
    lines = [
        f"**{report['notice']}**",
        "",
        f"Model: {report['source']} ({family.label}) — vision {shape['vision_layers']}×{shape['vision_hidden']} "
        f"({shape['image_size']}px/{shape['patch_size']}, {shape['vision_heads']} heads), "
        f"LM {shape['lm_layers']} layers d={shape['lm_hidden']} m={shape['lm_intermediate']} "
        f"{shape['lm_heads']} heads, vocab {shape['lm_vocab']}"
        + (f"; CLIP text {shape['clip_text_layers']}×{shape['clip_text_hidden']}"
           if any(row["text_tower_ms"]["median"] for row in rows) else "")
        + f". {report['dtype']}, batch {report['batch']}, {report['new_tokens']} new tokens"
        + (f"; picture {picture[0]}x{picture[1]}, {crops} crop{'s' if crops != 1 else ''} per image" if picture else "")
        + ".",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, "
        f"torch threads {machine['torch_threads']}, {machine['memory_gib']} GiB; torch {machine['torch']}, "
        f"transformers {machine['transformers']}; load average {machine['load_average_at_start'][0]:.1f} at start, "
        f"{machine['load_average_at_end'][0]:.1f} at end"
        + (f" ({', '.join(f'{v:.1f}' for v in machine['load_average_per_round'])} after each round)"
           if machine.get("load_average_per_round") else "") + ".",
        f"Device {report.get('device', 'cpu')}, attention {report.get('attn_implementation', {})}.",
        f"Median (min–max) of {report['repeats']} interleaved runs after {report['warmup']} warm-up; times in ms.",
        "",
        "| method | image tokens | LM tokens | vision crops × layers | vision | reduction | (CLIP text tower) "
        "| LM prefill | TTFT | decode ms/token | KV cache MiB | peak mem MiB | prefill GFLOPs | speed-up predicted "
        "| measured | fraction |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        text_tower = _ms(row["text_tower_ms"], 1) if row["text_tower_ms"]["median"] else "–"
        lines.append(
            f"| {row['method']} | {row['image_tokens']} | {row['prefill_tokens']} "
            f"| {row.get('vision_crops', 1)} × {row.get('vision_layers_run', shape['vision_layers'])} "
            f"| {_ms(row['vision_ms'])} "
            f"| {_ms(row['reduction_ms'], 1)} ({100 * row['reduction_over_vision']:.1f}%) | {text_tower} "
            f"| {_ms(row['prefill_ms'])} | {_ms(row['ttft_ms'])} | {_ms(row['decode_ms_per_token'], 1)} "
            f"| {_mib(row['kv_cache_bytes'])} | {_mib(row['peak_memory_bytes'])} "
            f"| {row['prefill_flops']['total'] / 1e9:.1f} | {row.get('prefill_speedup_predicted', 1):.2f}× "
            f"| {row.get('prefill_speedup_measured', 1):.2f}× | {100 * row.get('prefill_speedup_fraction', 1):.0f}% |"
        )
    attention = report.get("attention_acquisition")
    if attention:
        ours, theirs = attention["ours_sdpa_hooks"], attention["released_eager_all_maps"]
        lines += [
            "",
            "VisionZip's attention from the same vision tower (CLS row, head-mean keys and layer output of layer ℓ"
            + (f", over the image's {crops} crops" if crops > 1 else "") + "):",
            "",
            "| way | ms | attention maps materialised MiB | peak mem MiB |",
            "|---|---|---|---|",
            f"| ours: sdpa tower, layer ℓ's keys and CLS query recomputed from its input, CLS row only "
            f"| {_ms(ours['ms'])} | {_mib(ours['attention_map_bytes'])} "
            f"| {_mib(ours['peak_memory_bytes'])} |",
            f"| released: eager tower, output_attentions=True | {_ms(theirs['ms'])} "
            f"| {_mib(theirs['attention_map_bytes'])} | {_mib(theirs['peak_memory_bytes'])} |",
            "",
            f"The released way takes {attention['released_over_ours']:.2f}× our time.",
        ]
    lines += ["", "Overheads and speed-up vs the FLOP bound, and the vision tower against stock's (ratios within "
              "this run):", ""]
    for figure in report["figures"]:
        if figure["kind"] == "vision_vs_stock":  # a ratio of times next to its FLOP ratio
            lines.append(f"- {figure['figure']}: {figure['value']:.3f} by medians "
                         f"({figure['value_by_minima']:.3f} by minima)")
        else:
            lines.append(f"- {figure['figure']}: {100 * figure['value']:.1f}% by medians "
                         f"({100 * figure['value_by_minima']:.1f}% by minima)")
    kinds = [method for method in registry.METHODS.values() if any(row.get("kind") == method.name for row in rows)]
    steps = "; ".join(f"{method.label}: {method.reduction_steps}" for method in kinds or registry.METHODS.values())
    layout = (" and the released layout of each image's crops; stock LLaVA-NeXT's is its unpadding and newline "
              "tokens" if family.anyres else "")
    lines += [
        "",
        "Vision crops × layers = crops through the tower per image × encoder layers that ran (counted by hooks: a "
        "method reading layer -2 stops there, stock runs them all). "
        "Reduction = the image features (first tower start to projector end, inside `get_image_features`) minus the "
        f"vision tower and the projector ({steps}{layout}). Prefill = the first language-"
        "model call; TTFT = start of `generate` to the first LM-head output; decode = wall time per later step. "
        "Prefill FLOPs: q/k/v/o projections, three-matrix MLP, causal score/value products, LM head on one position; "
        "fraction = measured speed-up / FLOP-predicted speed-up over stock. Peak memory: RSS above the level before "
        "the call (warm-up run), weights excluded.",
    ]
    lines += render_batching(report)
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}×" if row.get(key) is not None else "–"


def render_batching(report: dict) -> list[str]:
    """The throughput and memory tables of the batch sweep (`bench.batching`), as markdown lines."""
    cells = report.get("batching") or []
    if not cells:
        return []
    device = report.get("device", "cpu")
    peak = ("CUDA allocator peak above the weights and inputs (`max_memory_allocated`)" if device.startswith("cuda")
            else "process RSS above its level before the call, sampled every ms (allocator slack included)")
    lines = [
        "",
        f"Throughput under batching ({device}): one `generate` call of B different pictures, "
        f"{report['new_tokens']} new tokens each. images/s = B / the call's wall time; \"vs released\" = over the "
        "same row at batch 1 (the released code's way: one image at a time); \"vs stock\" = over stock LLaVA at "
        "the same B; predicted = from the call's analytic FLOPs (vision, text tower, projector, prefill, decode; "
        "padding included). Padding = left-padding share of the LM prefill positions.",
        "",
        "| method | B | image tokens per image | images/s | TTFT ms | vs released measured | predicted "
        "| vs stock measured | predicted | padding |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in cells:
        tokens = sorted(row["image_tokens_per_image"])
        spread = str(tokens[0]) if tokens[0] == tokens[-1] else f"{tokens[0]}–{tokens[-1]}"
        lines.append(
            f"| {row['method']} | {row['batch']} | {spread} | {_ms(row['images_per_s'], 3)} | {_ms(row['ttft_ms'])} "
            f"| {_ratio(row, 'vs_released_measured')} | {_ratio(row, 'vs_released_predicted')} "
            f"| {_ratio(row, 'vs_stock_measured')} | {_ratio(row, 'vs_stock_predicted')} "
            f"| {100 * row['padding_fraction']:.1f}% |"
        )
    lines += [
        "",
        f"Memory per call, apart from the weights. Peak = {peak}: activations + KV cache, "
        + ("first (warm-up) run. " if report.get("warmup") else "first run (timed too: there was no warm-up). ")
        + "KV cache = bytes of the cache's key and value tensors after the prefill (padding included).",
        "",
        "| method | B | weights MiB | KV cache MiB | KV cache MiB per image | peak (activations + KV) MiB "
        "| peak per image MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in cells:
        batch, peak_bytes = row["batch"], row.get("peak_memory_bytes")
        lines.append(
            f"| {row['method']} | {batch} | {_mib(row['weights_bytes'])} | {_mib(row['kv_cache_bytes'])} "
            f"| {_mib(row['kv_cache_bytes'] / batch)} | {_mib(peak_bytes)} "
            f"| {_mib(None if peak_bytes is None else peak_bytes / batch)} |"
        )
    return lines


def render_plot(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["methods"]
    labels = [f"{row['method']}\n{row['image_tokens']} tok" for row in rows]
    parts = [("vision_ms", "vision tower", "#4c72b0"), ("reduction_ms", "reduction", "#dd8452"),
             ("projector_ms", "projector", "#937860"), ("prefill_ms", "LM prefill", "#55a868")]
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    bottoms = [0.0] * len(rows)
    positions = range(len(rows))
    for key, label, colour in parts:
        values = [max(row[key]["median"] or 0.0, 0.0) for row in rows]
        ax_time.bar(positions, values, bottom=bottoms, label=label, color=colour)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ttft = [row["ttft_ms"]["median"] for row in rows]
    ax_time.scatter(positions, ttft, color="black", marker="_", s=400, zorder=3, label="time to first token")
    ax_time.set_xticks(list(positions), labels, fontsize=8)
    ax_time.set_ylabel("ms (median)")
    ax_time.set_title("Where the time to first token goes")
    ax_time.legend(fontsize=8)
    if all("prefill_speedup_predicted" in row for row in rows):
        width = 0.38
        predicted = [row["prefill_speedup_predicted"] for row in rows]
        measured = [row["prefill_speedup_measured"] for row in rows]
        ax_speed.bar([p - width / 2 for p in positions], predicted, width, label="FLOP-predicted", color="#bbbbbb")
        ax_speed.bar([p + width / 2 for p in positions], measured, width, label="measured", color="#55a868")
        ax_speed.set_xticks(list(positions), labels, fontsize=8)
        ax_speed.set_ylabel("LM prefill speed-up over stock (×)")
        ax_speed.set_title("Prefill speed-up")
        ax_speed.legend(fontsize=8)
    shape = report["shape"]
    note = "RANDOM WEIGHTS — " if report["random_weights"] else ""
    fig.suptitle(
        f"{note}{report['source']}: vision {shape['vision_layers']} layers, LM {shape['lm_layers']} layers "
        f"(d={shape['lm_hidden']}), {report['dtype']}, {report['machine']['torch_threads']} threads",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_batch_plot(report: dict, path) -> None:
    """Images per second against the batch size, one line per row, and the peak memory per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["batching"]
    names = list(dict.fromkeys(cell["method"] for cell in cells))
    fig, (ax_rate, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in names:
        mine = sorted((c for c in cells if c["method"] == name), key=lambda c: c["batch"])
        sizes = [c["batch"] for c in mine]
        (line,) = ax_rate.plot(sizes, [c["images_per_s"]["median"] for c in mine], marker="o", label=name)
        colour = line.get_color()
        peaks = [c["peak_memory_bytes"] / c["batch"] / 2**20 if c.get("peak_memory_bytes") is not None else None
                 for c in mine]
        if all(p is not None for p in peaks):
            ax_memory.plot(sizes, peaks, marker="o", color=colour, label=name)
        ax_memory.plot(sizes, [c["kv_cache_bytes"] / c["batch"] / 2**20 for c in mine], linestyle=":",
                       marker=".", color=colour)
    for ax in (ax_rate, ax_memory):
        ax.set_xlabel("batch size (images per generate call)")
        ax.set_xticks(sorted({c["batch"] for c in cells}))
        ax.legend(fontsize=8)
    ax_rate.set_ylabel("images / s (median)")
    ax_rate.set_title("Throughput")
    ax_memory.set_ylabel("MiB per image")
    ax_memory.set_title("Peak activations + KV (solid), KV cache (dotted); weights apart")
    note = "RANDOM WEIGHTS — " if report["random_weights"] else ""
    fig.suptitle(f"{note}{report['source']}, {report['dtype']}, {report.get('device', 'cpu')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict, out_dir, stem: str = "bench") -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    render_plot(report, paths["png"])
    if len({cell["batch"] for cell in report.get("batching") or []}) > 1:
        paths["batch_png"] = out_dir / f"{stem}-batching.png"
        render_batch_plot(report, paths["batch_png"])
    return paths

