"""The `bench` command: stock LLaVA and every registered reduction method (VisionZip 192/128/64, TRIM and
PruMerge today, `llava_token_reduction.methods`) side by side, in one process.

All rows share one set of weights (the modules are the same objects) and see the same image and prompt.
Each timed run is one `generate` call with a few new tokens; forward hooks on the model's own modules
time the pieces of that call (nothing on the model is replaced), so the numbers are those of the shipped
code path:

    generate ─┬─ image features ─┬─ vision tower                 -> vision_ms
              │                  ├─ (TRIM) CLIP text tower       -> text_tower_ms (part of reduction_ms)
              │                  ├─ selection / merge / scoring  -> reduction_ms = features - tower - projector
              │                  └─ projector                    -> projector_ms
              ├─ language model, first call                      -> prefill_ms, KV-cache bytes
              ├─ LM head, first call                             -> ttft_ms (from the start of generate)
              └─ later steps                                     -> decode_ms_per_token (wall time per step)

"Image features" runs from the first tower starting to the projector finishing.

Runs are interleaved (repeat 1 of every row, then repeat 2, ...) after one warm-up run per row; the
report gives the median and the spread (min, max) over the repeats. Peak memory is the process RSS above its
level before the call, sampled every millisecond during the warm-up run (freed heap returned to the OS
first), so it counts activations, KV cache and allocator slack, not the weights.

Next to the times: the analytic LM prefill FLOPs of each run (`prefill_flops`), the FLOP-predicted prefill
speed-up over stock LLaVA and the measured speed-up as a fraction of it. And, for a method that reads a vision
layer's attention (VisionZip), the cost of obtaining it as the released code does (eager vision tower,
`output_attentions=True`, every map materialised) next to ours (sdpa tower + hooks on layer ℓ's q/k
projections + the CLS row only).

The preset models have random weights: right shapes, meaningless outputs. Timing does not depend on the
weights, except TRIM's kept-token count, which is adaptive and therefore arbitrary with random weights.

Every row also runs at the batch sizes asked for (`--batch-sizes`, default 1, 4, 8) on different pictures:
images per second, time to first token, the padding an adaptive count costs, memory apart from the weights,
and the FLOP-predicted ratios next to the measured ones, over the same row at batch 1 (the released way) and
over stock at the same batch size (`batching`). With `--device cuda` every clock reading waits for the GPU
(`torch.cuda.synchronize`) and the memory is the allocator's peak; nothing of CUDA runs otherwise.

Two model families: LLaVA-1.5 (one crop per image) and LLaVA-NeXT (`--preset llava-next-7b`: a 672x672 picture,
a 2x2 grid, 5 crops, 2928 stock placeholders; VisionZip at its per-crop budgets, 640/320/160 tokens).

The modules follow the seams: `shapes` (model widths, presets), `families` (stock and method classes per family,
default rows), `flops` (analytic FLOPs), `workloads` (rows, models on shared weights, inputs, batches),
`builders` (preset and checkpoint models), `measure` (hooks, clocks, memory, vision crops and layers run),
`batching` (the batch table's figures), `runner` (the interleaved runs and the derived figures), `report`
(markdown, plot, JSON) and `command` (the command line).
"""

from .batching import batch_rows, generate_flops, weights_bytes
from .builders import build_checkpoint_workload, build_preset_workload
from .command import register, run
from .families import FAMILIES, LLAVA, LLAVA_NEXT, BenchFamily, budget_row_name, family_of_model_type
from .flops import (
    clip_text_tower_flops,
    lm_prefill_flops,
    projector_flops,
    shape_flops,
    shape_prefill_flops,
    vision_tower_flops,
)
from .measure import (
    CudaPeak,
    PeakRSS,
    clock_of,
    image_feature_inputs,
    image_tokens_kept,
    kv_cache_bytes,
    measure_attention_acquisition,
    measure_generate,
    memory_meter,
)
from .report import render_batch_plot, render_markdown, render_plot, write_outputs
from .runner import RANDOM_WEIGHTS_NOTICE, figures, machine_info, run_benchmark
from .shapes import PRESETS, BenchShape
from .workloads import (
    DEFAULT_METHODS,
    DEFAULT_QUESTION,
    SAMPLE_IMAGE,
    Method,
    Workload,
    batch_images,
    build_models,
    default_methods,
    fit_image,
)


__all__ = [
    "batch_images", "batch_rows", "BenchFamily", "BenchShape", "budget_row_name", "build_checkpoint_workload",
    "build_models", "build_preset_workload", "clip_text_tower_flops", "clock_of", "CudaPeak", "default_methods",
    "DEFAULT_METHODS", "DEFAULT_QUESTION", "FAMILIES", "family_of_model_type", "figures", "fit_image",
    "generate_flops", "image_feature_inputs", "image_tokens_kept", "kv_cache_bytes", "LLAVA", "LLAVA_NEXT",
    "lm_prefill_flops", "machine_info", "measure_attention_acquisition", "measure_generate", "memory_meter", "Method",
    "PeakRSS", "PRESETS", "projector_flops", "RANDOM_WEIGHTS_NOTICE", "register", "render_batch_plot",
    "render_markdown", "render_plot", "run", "run_benchmark", "SAMPLE_IMAGE", "shape_flops", "shape_prefill_flops",
    "vision_tower_flops", "weights_bytes", "Workload", "write_outputs",
]
