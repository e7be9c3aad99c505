"""The whole benchmark: interleaved runs of every row, their summaries, and the figures derived from them."""

import contextlib
import os
import platform
import statistics
from dataclasses import asdict

from .batching import batch_rows, cell_figures
from .families import method_of
from .flops import shape_prefill_flops, vision_tower_flops
from .measure import image_feature_inputs, image_tokens_kept, measure_attention_acquisition, measure_generate
from .workloads import STOCK, Workload, batch_images


RANDOM_WEIGHTS_NOTICE = (
    "Weights are RANDOM (models built from configs, never trained): timings, token counts, FLOPs and memory are "
    "real for these shapes; TRIM's kept-token count is adaptive and arbitrary with random weights; outputs are "
    "gibberish."
)

METRICS = ("vision_ms", "reduction_ms", "text_tower_ms", "projector_ms", "prefill_ms", "ttft_ms",
           "decode_ms_per_token", "total_ms")


def _summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def machine_info() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib, "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


def _attention_implementations(model) -> dict:
    """The attention implementation the vision tower and the language model run with."""
    return {"vision": model.model.vision_tower.config._attn_implementation,
            "language_model": model.model.language_model.config._attn_implementation}


def _rows(workload: Workload, runs: dict, kept: dict, memory: dict) -> list[dict]:
    rows = []
    for name, model_runs in runs.items():
        first = model_runs[0]
        method = method_of(workload.models[name])
        row = {
            "method": name,
            "kind": method.name if method is not None else STOCK,
            "image_tokens": kept[name],
            "prefill_tokens": first["prefill_tokens"],
            "kv_cache_bytes": first["kv_cache_bytes"],
            "peak_memory_bytes": memory.get(name),
            "prefill_flops": shape_prefill_flops(workload.shape, first["prefill_tokens"]),
            # The tower as it ran (hooks): crops of the image, encoder layers (one fewer than stock at layer -2).
            "vision_crops": first["vision_crops"],
            "vision_layers_run": first["vision_layers_run"],
            "vision_flops": first["vision_crops"] * vision_tower_flops(workload.shape, first["vision_layers_run"]),
            **{metric: _summary([r[metric] for r in model_runs]) for metric in METRICS},
        }
        vision = row["vision_ms"]["median"]
        row["reduction_over_vision"] = row["reduction_ms"]["median"] / vision if vision else None
        # Minima are the least disturbed estimates on a shared machine; reported next to the medians.
        row["reduction_over_vision_by_minima"] = row["reduction_ms"]["min"] / row["vision_ms"]["min"]
        rows.append(row)
    stock = next((row for row in rows if row["method"] == STOCK), None)
    if stock is not None:
        for row in rows:
            predicted = stock["prefill_flops"]["total"] / row["prefill_flops"]["total"]
            measured = stock["prefill_ms"]["median"] / row["prefill_ms"]["median"]
            row["prefill_speedup_predicted"] = predicted
            row["prefill_speedup_measured"] = measured
            row["prefill_speedup_fraction"] = measured / predicted
            by_minima = stock["prefill_ms"]["min"] / row["prefill_ms"]["min"]
            row["prefill_speedup_fraction_by_minima"] = by_minima / predicted
            row["ttft_speedup"] = stock["ttft_ms"]["median"] / row["ttft_ms"]["median"]
            row["vision_flops_vs_stock"] = row["vision_flops"] / stock["vision_flops"]
            row["vision_ms_vs_stock"] = row["vision_ms"]["median"] / stock["vision_ms"]["median"]
            row["vision_ms_vs_stock_by_minima"] = row["vision_ms"]["min"] / stock["vision_ms"]["min"]
    return rows


def _attention_acquisition(model, inputs: dict, warmup: int, repeats: int, log) -> dict:
    samples = {"ours_sdpa_hooks": [], "released_eager_all_maps": []}
    peaks = {}
    image_inputs = image_feature_inputs(model, inputs)
    pixels = image_inputs.pop("pixel_values")
    for round_index in range(warmup + repeats):
        result = measure_attention_acquisition(model, pixels, with_memory=(round_index == 0), **image_inputs)
        for key, value in result.items():
            if round_index == 0:
                peaks[key] = (value.get("peak_memory_bytes"), value["attention_map_bytes"])
            if round_index >= warmup:
                samples[key].append(value["ms"])
    attention = {
        key: {"ms": _summary(samples[key]), "peak_memory_bytes": peaks[key][0], "attention_map_bytes": peaks[key][1]}
        for key in samples
    }
    ours, theirs = attention["ours_sdpa_hooks"]["ms"]["median"], attention["released_eager_all_maps"]["ms"]["median"]
    attention["released_over_ours"] = theirs / ours if ours else None
    log(f"  {method_of(model).label} attention: ours {ours:.0f} ms, released way {theirs:.0f} ms")
    return attention


def figures(rows: list[dict], workload: Workload) -> list[dict]:
    """The derived figures, per reduced row: what the reduction costs next to the vision tower, the measured
    LM prefill speed-up as a fraction of the one the FLOPs predict (the FLOP bound), and the vision tower's time
    over stock's next to the FLOP ratio of the crops and layers that ran (the dead-layer cut)."""
    out = []
    for row in rows:
        method = method_of(workload.models[row["method"]])
        if method is None:
            continue
        out.append({
            "figure": f"{row['method']}: reduction overhead / vision tower",
            "method": row["method"], "kind": "reduction_over_vision",
            "value": row["reduction_over_vision"], "value_by_minima": row["reduction_over_vision_by_minima"],
        })
        if "prefill_speedup_fraction" in row:
            out.append({
                "figure": f"{row['method']}: measured LM prefill speed-up / FLOP-predicted speed-up",
                "method": row["method"], "kind": "prefill_speedup_fraction",
                "value": row["prefill_speedup_fraction"], "value_by_minima": row["prefill_speedup_fraction_by_minima"],
            })
        if "vision_ms_vs_stock" in row:
            out.append({
                "figure": f"{row['method']}: vision tower time / stock's ({row['vision_layers_run']} of "
                          f"{workload.shape.vision_layers} layers; FLOP ratio {row['vision_flops_vs_stock']:.3f})",
                "method": row["method"], "kind": "vision_vs_stock", "predicted": row["vision_flops_vs_stock"],
                "value": row["vision_ms_vs_stock"], "value_by_minima": row["vision_ms_vs_stock_by_minima"],
            })
    return out


def run_benchmark(workload: Workload, repeats: int = 3, warmup: int = 1, new_tokens: int = 8,
                  attention_comparison: bool = True, log=print, batch_sizes=(1,), image=None) -> dict:
    """Run every method `warmup + repeats` times at every batch size (interleaved: round by round, in each round
    every batch size, in each every row) and summarise. Batch 1 runs on the workload's inputs; a batch of `B`
    on `B` pictures made from `image` (default: the workload's picture; `batch_images`; batch 1 is always run:
    it is the released way). The first round measures peak memory too. Returns the JSON-able report."""
    from tqdm.auto import tqdm

    shape = workload.shape
    load_at_start = os.getloadavg()
    names = list(workload.models)
    batch_sizes = sorted({1, *batch_sizes})
    batches = {1: workload.inputs}
    image = workload.image if image is None else image
    for size in batch_sizes[1:]:
        if image is None:
            raise ValueError("batch sizes above 1 need the image the batches are made from (image=...)")
        batches[size] = workload.batch(batch_images(image, size))
    cells = {(name, size): {"runs": []} for size in batch_sizes for name in names}
    runs = {name: cells[name, 1]["runs"] for name in names}
    memory = {}
    load_per_round = []  # 1-minute load average after each round: how busy the machine was while it ran
    kept = {name: image_tokens_kept(workload.models[name], workload.inputs[name]) for name in names}
    progress = tqdm(total=(warmup + repeats) * len(cells), desc="bench", unit="run", disable=log is not print)
    if log is print:
        log = progress.write  # keeps the progress bar below the lines
    for round_index in range(warmup + repeats):
        timed = round_index >= warmup
        for size in batch_sizes:
            for name in names:
                cell = cells[name, size]
                result = measure_generate(
                    workload.models[name], batches[size][name], new_tokens, with_memory=(round_index == 0)
                )
                progress.update()
                if round_index == 0:
                    cell.update(cell_figures(workload, name, batches[size][name], result))
                    cell["peak_memory_bytes"] = result.get("peak_memory_bytes")
                    if size == 1:
                        memory[name] = result.get("peak_memory_bytes")
                if timed:
                    cell["runs"].append(result)
                log(f"  {'run ' + str(round_index - warmup + 1) if timed else 'warm-up'} {name} batch {size}: "
                    f"vision {result['vision_ms']:.0f} ms, reduction {result['reduction_ms']:.1f} ms, "
                    f"prefill {result['prefill_ms']:.0f} ms ({result['prefill_tokens']} tokens), "
                    f"TTFT {result['ttft_ms']:.0f} ms, total {result['total_ms']:.0f} ms")
        load_per_round.append(os.getloadavg()[0])
    progress.close()
    rows = _rows(workload, runs, kept, memory)

    attention = None
    # The first row whose method reads a vision layer's attention: how much the released way of getting it costs.
    attending = next((n for n in names if getattr(method_of(workload.models[n]), "captures_vision_attention", False)),
                     None)
    if attention_comparison and attending is not None:
        attention = _attention_acquisition(workload.models[attending], workload.inputs[attending], warmup, repeats, log)

    return {
        "random_weights": workload.random_weights,
        "notice": RANDOM_WEIGHTS_NOTICE if workload.random_weights else "Weights loaded from " + workload.source,
        "source": workload.source,
        "shape": asdict(shape),
        "family": shape.family,
        "input_image_size": list(image.size) if image is not None else None,
        "vision_tower_flops": vision_tower_flops(shape),
        "dtype": str(next(iter(workload.models.values())).dtype).replace("torch.", ""),
        "batch": 1,
        "batch_sizes": batch_sizes,
        "device": str(workload.device),
        "attn_implementation": _attention_implementations(next(iter(workload.models.values()))),
        "repeats": repeats,
        "warmup": warmup,
        "new_tokens": new_tokens,
        "machine": {**machine_info(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                    "load_average_per_round": load_per_round},
        "methods": rows,
        "batching": batch_rows(cells, _summary),
        "attention_acquisition": attention,
        "figures": figures(rows, workload),
        "notes": list(workload.notes),
    }
