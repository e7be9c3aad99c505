"""The `bench` command: stock LLaVA, VisionZip (192/128/64) and TRIM side by side, in one process.

All methods share one set of weights (the modules are the same objects) and see the same image and prompt.
Each timed run is one `generate` call with a few new tokens; forward hooks on the model's own modules
time the pieces of that call, so the numbers are those of the shipped code path:

    generate ─┬─ get_image_features ─┬─ vision tower                 -> vision_ms
              │                      ├─ (TRIM) CLIP text tower       -> text_tower_ms (part of reduction_ms)
              │                      ├─ selection / merge / scoring  -> reduction_ms = features - tower - projector
              │                      └─ projector                    -> projector_ms
              ├─ language model, first call                          -> prefill_ms, KV-cache bytes
              ├─ LM head, first call                                 -> ttft_ms (from the start of generate)
              └─ later steps                                         -> decode_ms_per_token (wall time per step)

Runs are interleaved (repeat 1 of every method, then repeat 2, ...) after one warm-up run per method; the
report gives the median and the spread (min, max) over the repeats. Peak memory is the process RSS above its
level before the call, sampled every millisecond during the warm-up run (freed heap returned to the OS
first), so it counts activations, KV cache and allocator slack, not the weights.

Next to the times: the analytic LM prefill FLOPs of each run (`prefill_flops`), the FLOP-predicted prefill
speed-up over stock LLaVA and the measured speed-up as a fraction of it. And the cost of obtaining
VisionZip's attention as the released code does (eager vision tower, `output_attentions=True`, every map
materialised) next to ours (sdpa tower + hooks on layer ℓ's q/k projections + the CLS row only).

The preset models have random weights: right shapes, meaningless outputs. Timing does not depend on the
weights, except TRIM's kept-token count, which is adaptive and therefore arbitrary with random weights.
"""

import argparse
import contextlib
import ctypes
import functools
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"
DEFAULT_QUESTION = "What is shown in this picture? Describe the objects and their colours."
RANDOM_WEIGHTS_NOTICE = (
    "Weights are RANDOM (models built from configs, never trained): timings, token counts, FLOPs and memory are "
    "real for these shapes; TRIM's kept-token count is adaptive and arbitrary with random weights; outputs are gibberish."
)


# --------------------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class BenchShape:
    """Widths and depths of a LLaVA-1.5-style model: CLIP vision tower, CLIP text tower (for TRIM),
    two-layer projector, Llama language model."""

    name: str
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
    # The demo model's shape (576 patches as LLaVA-1.5, narrow layers): seconds on a CPU, for tests.
    "tiny": BenchShape(
        name="tiny", vision_hidden=128, vision_intermediate=512, vision_layers=6, vision_heads=4, projection_dim=64,
        clip_text_hidden=64, clip_text_intermediate=256, clip_text_layers=2, clip_text_heads=4, clip_text_vocab=600,
        lm_hidden=256, lm_intermediate=768, lm_layers=4, lm_heads=8, lm_kv_heads=8, lm_vocab=300,
    ),
}


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: `kind` is stock, visionzip or trim."""

    name: str
    kind: str
    dominant_tokens: int | None = None
    contextual_tokens: int | None = None


DEFAULT_METHODS = (
    Method("stock", "stock"),
    Method("visionzip-192", "visionzip", 162, 30),
    Method("visionzip-128", "visionzip", 108, 20),
    Method("visionzip-64", "visionzip", 54, 10),
    Method("trim", "trim"),
)


# --------------------------------------------------------------------------------------------------------------
# Analytic FLOPs (multiply-add = 2 FLOPs)


def lm_prefill_flops(
    tokens: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
    logits_tokens: int = 1,
) -> dict:
    """FLOPs of a Llama prefill over `tokens` positions, by part.

    Per layer: the q/k/v/o projections (`k`, `v` narrower under grouped-query attention), the three-matrix
    SwiGLU MLP (gate, up, down), and the attention score (`Q·Kᵀ`) and value (`P·V`) products over the
    causally visible pairs, `tokens·(tokens+1)/2` per head. Plus the LM head on the `logits_tokens` last
    positions (generate computes logits for the last position only). Norms, rotary embeddings, softmax and
    the activation are left out (a few FLOPs per element, under 1% here).
    """
    head_dim = hidden // heads
    kv_width = kv_heads * head_dim
    pairs = tokens * (tokens + 1) // 2
    parts = {
        "qkvo_projections": layers * 2 * tokens * hidden * (2 * hidden + 2 * kv_width),
        "mlp": layers * 2 * tokens * 3 * hidden * intermediate,
        "attention_scores_values": layers * 2 * 2 * heads * head_dim * pairs,
        "lm_head": 2 * logits_tokens * hidden * vocab,
    }
    parts["total"] = sum(parts.values())
    return parts


def vision_tower_flops(shape: BenchShape, layers: int | None = None) -> int:
    """FLOPs of the CLIP vision tower on one image: patch embedding, then per layer the four attention
    projections, the full (non-causal) score and value products and the two-matrix MLP."""
    layers = shape.vision_layers if layers is None else layers
    n, d = shape.patches + 1, shape.vision_hidden
    embed = 2 * shape.patches * 3 * shape.patch_size**2 * d
    per_layer = 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * shape.vision_intermediate
    return embed + layers * per_layer


def shape_flops(shape: BenchShape, tokens: int) -> int:
    return lm_prefill_flops(
        tokens, shape.lm_hidden, shape.lm_intermediate, shape.lm_layers, shape.lm_heads, shape.lm_kv_heads,
        shape.lm_vocab,
    )["total"]


# --------------------------------------------------------------------------------------------------------------
# Models that share one set of weights


def _configs(shape: BenchShape, image_token_id: int, pad_id: int, bos_id: int, eos_id: int, clip_ids=(None, None, None)):
    from transformers import CLIPTextConfig, CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=shape.projection_dim,
    )
    text = LlamaConfig(
        hidden_size=shape.lm_hidden, intermediate_size=shape.lm_intermediate, num_hidden_layers=shape.lm_layers,
        num_attention_heads=shape.lm_heads, num_key_value_heads=shape.lm_kv_heads, vocab_size=shape.lm_vocab,
        max_position_embeddings=4096, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    clip_text = CLIPTextConfig(
        bos_token_id=clip_ids[0], eos_token_id=clip_ids[1], pad_token_id=clip_ids[2],
        hidden_size=shape.clip_text_hidden, intermediate_size=shape.clip_text_intermediate,
        num_hidden_layers=shape.clip_text_layers, num_attention_heads=shape.clip_text_heads,
        projection_dim=shape.projection_dim, vocab_size=shape.clip_text_vocab, max_position_embeddings=77,
    )
    common = dict(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=shape.patches, pad_token_id=pad_id,
    )
    return common, clip_text


def build_models(base, methods, trim_overrides: dict | None = None) -> dict:
    """One model per method, all on the weights of `base` (a TRIM model or a stock LLaVA)."""
    from transformers import LlavaForConditionalGeneration

    from . import LlavaTrimForConditionalGeneration, LlavaVisionZipForConditionalGeneration
    from .shared_weights import twin

    models = {}
    for method in methods:
        if method.kind == "trim":
            if not isinstance(base, LlavaTrimForConditionalGeneration):
                raise ValueError("TRIM needs a CLIP text tower: the base model is not a TRIM model")
            model = base
            for key, value in (trim_overrides or {}).items():
                setattr(model.config, key, value)
        elif method.kind == "stock":
            model = twin(base, LlavaForConditionalGeneration)
        else:
            model = twin(base, LlavaVisionZipForConditionalGeneration, dominant_tokens=method.dominant_tokens,
                         contextual_tokens=method.contextual_tokens)
        model.generation_config.pad_token_id = getattr(base.config, "pad_token_id", None)
        models[method.name] = model.eval()
    return models


@dataclass
class Workload:
    """The models, their inputs and a description of where they came from."""

    shape: BenchShape
    models: dict
    inputs: dict  # method name -> generate kwargs
    random_weights: bool
    source: str
    notes: list = field(default_factory=list)


def _clip_rows(clip_tokenizer, question: str):
    encoded = clip_tokenizer(
        [question], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    return {"clip_input_ids": encoded["input_ids"], "clip_attention_mask": encoded["attention_mask"]}


def _prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def build_preset_workload(shape: BenchShape, image, question: str, methods, seed: int = 0) -> Workload:
    """Random-weight models of `shape` (built locally from configs) and the processed inputs."""
    import torch
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from . import LlavaTrimConfig, LlavaTrimForConditionalGeneration
    from .tiny import LLAVA_CHAT_TEMPLATE, build_clip_tokenizer, build_llm_tokenizer

    tokenizer = build_llm_tokenizer()
    clip_tokenizer = build_clip_tokenizer()
    if len(tokenizer) > shape.lm_vocab or len(clip_tokenizer) > shape.clip_text_vocab:
        raise ValueError("the preset's vocabularies are smaller than the offline tokenizers")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size}
        ),
        tokenizer=tokenizer, patch_size=shape.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    common, clip_text = _configs(
        shape, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id, tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        clip_ids=(clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id),
    )
    torch.manual_seed(seed)
    base = LlavaTrimForConditionalGeneration(
        LlavaTrimConfig(**common, clip_text_config=clip_text, projection_dim=shape.projection_dim)
    ).eval()
    models = build_models(base, methods)
    stock_inputs = dict(processor(images=image, text=_prompt(question), return_tensors="pt"))
    clip = _clip_rows(clip_tokenizer, question)
    inputs = {m.name: {**stock_inputs, **(clip if m.kind == "trim" else {})} for m in methods}
    return Workload(shape, models, inputs, random_weights=True, source=f"preset {shape.name}")


def build_checkpoint_workload(path: str, image, question: str, methods, dtype: str = "float32") -> Workload:
    """Models on a local checkpoint: stock LLaVA, VisionZip or TRIM (TRIM rows need a TRIM checkpoint,
    which carries the CLIP text tower)."""
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from . import LlavaTrimForConditionalGeneration
    from .tiny import build_clip_tokenizer

    config = AutoConfig.from_pretrained(path)
    torch_dtype = getattr(torch, dtype)
    notes = []
    if config.model_type == "llava_trim":
        base = LlavaTrimForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
    else:
        base = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).eval()
        if any(m.kind == "trim" for m in methods):
            notes.append("TRIM skipped: the checkpoint has no CLIP text tower (convert it with `convert trim`).")
            methods = [m for m in methods if m.kind != "trim"]
    processor = AutoProcessor.from_pretrained(path)
    vision, text = base.config.vision_config, base.config.text_config
    shape = BenchShape(
        name=Path(path).name, image_size=vision.image_size, patch_size=vision.patch_size,
        vision_hidden=vision.hidden_size, vision_intermediate=vision.intermediate_size,
        vision_layers=vision.num_hidden_layers, vision_heads=vision.num_attention_heads,
        lm_hidden=text.hidden_size, lm_intermediate=text.intermediate_size, lm_layers=text.num_hidden_layers,
        lm_heads=text.num_attention_heads, lm_kv_heads=text.num_key_value_heads, lm_vocab=text.vocab_size,
    )
    clip_text = getattr(base.config, "clip_text_config", None)
    if clip_text is not None:  # report the checkpoint's CLIP text tower, not the ViT-L/14 defaults
        shape = replace(
            shape, projection_dim=base.config.projection_dim, clip_text_hidden=clip_text.hidden_size,
            clip_text_intermediate=clip_text.intermediate_size, clip_text_layers=clip_text.num_hidden_layers,
            clip_text_heads=clip_text.num_attention_heads, clip_text_vocab=clip_text.vocab_size,
        )
    models = build_models(base, methods)
    # A TRIM processor also returns the CLIP rows: keep them for the TRIM row only.
    stock_inputs = dict(processor(images=image, text=_prompt(question), return_tensors="pt"))
    for key in ("clip_input_ids", "clip_attention_mask"):
        stock_inputs.pop(key, None)
    stock_inputs["pixel_values"] = stock_inputs["pixel_values"].to(torch_dtype)
    clip_tokenizer = getattr(processor, "clip_tokenizer", None) or build_clip_tokenizer()
    clip = _clip_rows(clip_tokenizer, question)
    inputs = {m.name: {**stock_inputs, **(clip if m.kind == "trim" else {})} for m in methods}
    return Workload(shape, models, inputs, random_weights=False, source=str(path), notes=notes)


# --------------------------------------------------------------------------------------------------------------
# Measuring one generate call


class PeakRSS:
    """Peak resident memory of this process above its level at entry, sampled every `interval` seconds in a
    thread. Freed heap memory is returned to the OS first (glibc `malloc_trim`), so the baseline is honest."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def trim_heap():
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def _sample(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes() - self.baseline)
            time.sleep(self.interval)

    def __enter__(self):
        self.trim_heap()
        self.baseline = self.rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.rss_bytes() - self.baseline)
        return False


class _Stopwatch:
    """Forward pre/post hooks that record `perf_counter` spans of named modules, removed on exit."""

    def __init__(self, modules: dict):
        self.modules = {name: module for name, module in modules.items() if module is not None}
        self.spans = {name: [] for name in self.modules}
        self.first_output = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre(name)))
            self._handles.append(module.register_forward_hook(self._post(name)))
        return self

    def _pre(self, name):
        def hook(module, args):
            self.spans[name].append([time.perf_counter(), None])

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.spans[name][-1][1] = time.perf_counter()
            if name not in self.first_output:
                self.first_output[name] = output

        return hook

    def total(self, name) -> float:
        return sum(end - start for start, end in self.spans.get(name, []))

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers cache (any layer layout)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "nbytes"):
                total += tensor.nbytes
    return total


def measure_generate(model, inputs: dict, new_tokens: int, with_memory: bool = False) -> dict:
    """One `generate` call with `new_tokens` new tokens, timed piece by piece (see the module docstring)."""
    import torch

    inner = model.model
    watched = {
        "vision": inner.vision_tower,
        "projector": inner.multi_modal_projector,
        "text_tower": getattr(inner, "clip_text_model", None),
        "lm": inner.language_model,
        "head": model.lm_head,
    }
    feature_spans = []
    original = inner.get_image_features

    # generate reads the wrapped method's signature to pick its inputs: keep it visible.
    @functools.wraps(original)
    def timed_features(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            feature_spans.append(time.perf_counter() - start)

    kv_bytes = {}

    def remember_cache(module, args, kwargs, output):
        if "bytes" not in kv_bytes:
            kv_bytes["bytes"] = kv_cache_bytes(getattr(output, "cache", None))
            embeds = kwargs.get("inputs_embeds")
            kv_bytes["tokens"] = int(embeds.shape[1]) if embeds is not None else int(kwargs["input_ids"].shape[1])

    inner.get_image_features = timed_features  # this instance only; removed below
    cache_hook = inner.language_model.register_forward_hook(remember_cache, with_kwargs=True)
    memory = PeakRSS() if with_memory else contextlib.nullcontext()
    try:
        with _Stopwatch(watched) as watch, memory, torch.inference_mode():
            start = time.perf_counter()
            output = model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            )
            end = time.perf_counter()
    finally:
        cache_hook.remove()
        del inner.get_image_features
    head_ends = [span[1] for span in watch.spans["head"]]
    lm_spans = watch.spans["lm"]
    vision_ms = 1000 * watch.total("vision")
    projector_ms = 1000 * watch.total("projector")
    text_tower_ms = 1000 * watch.total("text_tower")
    features_ms = 1000 * sum(feature_spans)
    steps = [b - a for a, b in zip(head_ends, head_ends[1:])]
    result = {
        "vision_ms": vision_ms,
        "reduction_ms": features_ms - vision_ms - projector_ms,
        "text_tower_ms": text_tower_ms,
        "projector_ms": projector_ms,
        "prefill_ms": 1000 * (lm_spans[0][1] - lm_spans[0][0]),
        "ttft_ms": 1000 * (head_ends[0] - start),
        "decode_ms_per_token": 1000 * statistics.median(steps) if steps else float("nan"),
        "total_ms": 1000 * (end - start),
        "prefill_tokens": kv_bytes.get("tokens"),
        "kv_cache_bytes": kv_bytes.get("bytes"),
        "new_tokens": int(output.shape[1] - inputs["input_ids"].shape[1]),
    }
    if with_memory:
        result["peak_memory_bytes"] = memory.peak_bytes
    return result


def image_tokens_kept(model, inputs: dict) -> int:
    """Image tokens the language model sees (one image)."""
    import torch

    keys = ("pixel_values", "clip_input_ids", "clip_attention_mask")
    with torch.inference_mode():
        features = model.model.get_image_features(**{k: inputs[k] for k in keys if k in inputs})
    pooled = features.pooler_output
    return int(pooled[0].shape[0]) if isinstance(pooled, (list, tuple)) else int(pooled.shape[-2])


# --------------------------------------------------------------------------------------------------------------
# VisionZip's attention: released way (eager, all maps) vs ours (sdpa + hooks, CLS row only)


def measure_attention_acquisition(model, pixel_values, with_memory: bool = False) -> dict:
    """Time (and optionally peak memory) of getting layer ℓ's CLS attention, head-mean keys and output.

    `ours`: the sdpa tower with hooks on layer ℓ's `q_proj`/`k_proj` and output, then the CLS row only
    (`LlavaVisionZipModel.get_visionzip_layer_outputs`, the shipped code path). `released`: the tower switched to eager attention
    with `output_attentions=True` and `output_hidden_states=True` (every layer's `[H, N, N]` map materialised,
    as the released code runs it), the CLS row summed over heads from the maps and the keys from a hook.
    Both on the same tower and pixels.
    """
    import torch

    from .modeling.modeling_reduced_llava import capture_outputs_of

    config = model.config
    tower = model.model.vision_tower
    layer_index = config.visionzip_layer
    layer = tower.encoder.layers[layer_index]
    heads = config.vision_config.num_attention_heads
    results = {}

    def ours():
        model.model.get_visionzip_layer_outputs(pixel_values)
        return {"attention_map_bytes": 0}

    def released():
        previous = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            with capture_outputs_of({"k": layer.self_attn.k_proj}) as got:
                out = tower(pixel_values, output_attentions=True, output_hidden_states=True, return_dict=True)
            attention = out.attentions[layer_index]
            cls_attention = attention[:, :, 0].sum(dim=1)
            batch, tokens, _ = got["k"].shape
            mean_keys = got["k"].view(batch, tokens, heads, -1).mean(dim=2)
            return {"attention_map_bytes": sum(a.nbytes for a in out.attentions)}
        finally:
            tower.set_attn_implementation(previous)

    for name, run in (("ours_sdpa_hooks", ours), ("released_eager_all_maps", released)):
        memory = PeakRSS() if with_memory else contextlib.nullcontext()
        with memory, torch.inference_mode():
            start = time.perf_counter()
            info = run()
            elapsed = time.perf_counter() - start
        results[name] = {"ms": 1000 * elapsed, **info}
        if with_memory:
            results[name]["peak_memory_bytes"] = memory.peak_bytes
    return results


# --------------------------------------------------------------------------------------------------------------
# The whole benchmark


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


def run_benchmark(workload: Workload, repeats: int = 3, warmup: int = 1, new_tokens: int = 8,
                  attention_comparison: bool = True, log=print) -> dict:
    """Run every method `warmup + repeats` times (interleaved) and summarise. Returns the JSON-able report."""
    shape = workload.shape
    load_at_start = os.getloadavg()
    names = list(workload.models)
    runs = {name: [] for name in names}
    memory = {}
    kept = {name: image_tokens_kept(workload.models[name], workload.inputs[name]) for name in names}
    for round_index in range(warmup + repeats):
        timed = round_index >= warmup
        for name in names:
            result = measure_generate(
                workload.models[name], workload.inputs[name], new_tokens, with_memory=(round_index == 0)
            )
            if round_index == 0:
                memory[name] = result.get("peak_memory_bytes")
            if timed:
                runs[name].append(result)
            log(f"  {'run ' + str(round_index - warmup + 1) if timed else 'warm-up'} {name}: "
                f"vision {result['vision_ms']:.0f} ms, reduction {result['reduction_ms']:.1f} ms, "
                f"prefill {result['prefill_ms']:.0f} ms ({result['prefill_tokens']} tokens), "
                f"TTFT {result['ttft_ms']:.0f} ms")

    metrics = ("vision_ms", "reduction_ms", "text_tower_ms", "projector_ms", "prefill_ms", "ttft_ms",
               "decode_ms_per_token", "total_ms")
    rows = []
    stock_name = next((n for n in names if n == "stock"), None)
    for name in names:
        first = runs[name][0]
        flops = lm_prefill_flops(
            first["prefill_tokens"], shape.lm_hidden, shape.lm_intermediate, shape.lm_layers, shape.lm_heads,
            shape.lm_kv_heads, shape.lm_vocab,
        )
        row = {
            "method": name,
            "image_tokens": kept[name],
            "prefill_tokens": first["prefill_tokens"],
            "kv_cache_bytes": first["kv_cache_bytes"],
            "peak_memory_bytes": memory.get(name),
            "prefill_flops": flops,
            **{metric: _summary([r[metric] for r in runs[name]]) for metric in metrics},
        }
        vision = row["vision_ms"]["median"]
        row["reduction_over_vision"] = row["reduction_ms"]["median"] / vision if vision else None
        # Minima are the least disturbed estimates on a shared machine; reported next to the medians.
        row["reduction_over_vision_by_minima"] = row["reduction_ms"]["min"] / row["vision_ms"]["min"]
        rows.append(row)
    if stock_name is not None:
        stock = next(r for r in rows if r["method"] == stock_name)
        for row in rows:
            predicted = stock["prefill_flops"]["total"] / row["prefill_flops"]["total"]
            measured = stock["prefill_ms"]["median"] / row["prefill_ms"]["median"]
            row["prefill_speedup_predicted"] = predicted
            row["prefill_speedup_measured"] = measured
            row["prefill_speedup_fraction"] = measured / predicted
            row["prefill_speedup_fraction_by_minima"] = stock["prefill_ms"]["min"] / row["prefill_ms"]["min"] / predicted
            row["ttft_speedup"] = stock["ttft_ms"]["median"] / row["ttft_ms"]["median"]

    attention = None
    vz_name = next((n for n in names if n.startswith("visionzip")), None)
    if attention_comparison and vz_name is not None:
        model, pixels = workload.models[vz_name], workload.inputs[vz_name]["pixel_values"]
        samples = {"ours_sdpa_hooks": [], "released_eager_all_maps": []}
        peaks = {}
        for round_index in range(warmup + repeats):
            result = measure_attention_acquisition(model, pixels, with_memory=(round_index == 0))
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
        log(f"  VisionZip attention: ours {ours:.0f} ms, released way {theirs:.0f} ms")

    report = {
        "random_weights": workload.random_weights,
        "notice": RANDOM_WEIGHTS_NOTICE if workload.random_weights else "Weights loaded from " + workload.source,
        "source": workload.source,
        "shape": asdict(shape),
        "vision_tower_flops": vision_tower_flops(shape),
        "dtype": str(next(iter(workload.models.values())).dtype).replace("torch.", ""),
        "batch": 1,
        "repeats": repeats,
        "warmup": warmup,
        "new_tokens": new_tokens,
        "machine": {**machine_info(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()},
        "methods": rows,
        "attention_acquisition": attention,
        "targets": targets(rows),
        "notes": list(workload.notes),
    }
    return report


def targets(rows: list[dict]) -> list[dict]:
    """The issue's three targets, checked against the medians."""
    by_name = {row["method"]: row for row in rows}
    checks = []
    for row in rows:
        if row["method"].startswith("visionzip"):
            checks.append({
                "target": f"{row['method']}: selection + merge <= 3% of the vision tower",
                "value": row["reduction_over_vision"], "value_by_minima": row["reduction_over_vision_by_minima"],
                "limit": 0.03, "met": row["reduction_over_vision"] <= 0.03,
            })
    if "trim" in by_name:
        value = by_name["trim"]["reduction_over_vision"]
        checks.append({"target": "trim: text tower + scoring + selection <= 10% of the vision tower",
                       "value": value, "value_by_minima": by_name["trim"]["reduction_over_vision_by_minima"],
                       "limit": 0.10, "met": value <= 0.10})
    row64 = by_name.get("visionzip-64")
    if row64 is not None and "prefill_speedup_fraction" in row64:
        value = row64["prefill_speedup_fraction"]
        checks.append({"target": "visionzip-64: measured LM prefill speed-up >= 90% of the FLOP-predicted one",
                       "value": value, "value_by_minima": row64["prefill_speedup_fraction_by_minima"],
                       "limit": 0.90, "met": value >= 0.90})
    return checks


# --------------------------------------------------------------------------------------------------------------
# Output: markdown and a plot


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
    lines = [
        f"**{report['notice']}**",
        "",
        f"Model: {report['source']} — vision {shape['vision_layers']}×{shape['vision_hidden']} "
        f"({shape['image_size']}px/{shape['patch_size']}, {shape['vision_heads']} heads), LM {shape['lm_layers']} layers "
        f"d={shape['lm_hidden']} m={shape['lm_intermediate']} {shape['lm_heads']} heads, vocab {shape['lm_vocab']}; "
        f"CLIP text {shape['clip_text_layers']}×{shape['clip_text_hidden']}. {report['dtype']}, batch {report['batch']}, "
        f"{report['new_tokens']} new tokens.",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, torch threads {machine['torch_threads']}, "
        f"{machine['memory_gib']} GiB; torch {machine['torch']}, transformers {machine['transformers']}; "
        f"load average {machine['load_average_at_start'][0]:.1f} at start, {machine['load_average_at_end'][0]:.1f} at end.",
        f"Median (min–max) of {report['repeats']} interleaved runs after {report['warmup']} warm-up; times in ms.",
        "",
        "| method | image tokens | LM tokens | vision | reduction | (TRIM text tower) | LM prefill | TTFT | decode ms/token "
        "| KV cache MiB | peak mem MiB | prefill GFLOPs | speed-up predicted | measured | fraction |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["methods"]:
        text_tower = _ms(row["text_tower_ms"], 1) if row["text_tower_ms"]["median"] else "–"
        lines.append(
            f"| {row['method']} | {row['image_tokens']} | {row['prefill_tokens']} | {_ms(row['vision_ms'])} "
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
            "VisionZip's attention from the same vision tower (CLS row, head-mean keys and layer output of layer ℓ):",
            "",
            "| way | ms | attention maps materialised MiB | peak mem MiB |",
            "|---|---|---|---|",
            f"| ours: sdpa tower + hooks, CLS row only | {_ms(ours['ms'])} | {_mib(ours['attention_map_bytes'])} | {_mib(ours['peak_memory_bytes'])} |",
            f"| released: eager tower, output_attentions=True | {_ms(theirs['ms'])} | {_mib(theirs['attention_map_bytes'])} | {_mib(theirs['peak_memory_bytes'])} |",
            "",
            f"The released way takes {attention['released_over_ours']:.2f}× our time.",
        ]
    lines += ["", "Targets:", ""]
    for check in report["targets"]:
        lines.append(f"- {'MET' if check['met'] else 'MISSED'}: {check['target']} — {100 * check['value']:.1f}% "
                     f"by medians ({100 * check['value_by_minima']:.1f}% by minima)")
    lines += [
        "",
        "Reduction = `get_image_features` minus the vision tower and the projector (VisionZip: CLS row, selection, "
        "merge; TRIM: CLIP text tower, patch embeddings, scoring, IQR count, selection). Prefill = the first language-"
        "model call; TTFT = start of `generate` to the first LM-head output; decode = wall time per later step. "
        "Prefill FLOPs: q/k/v/o projections, three-matrix MLP, causal score/value products, LM head on one position; "
        "fraction = measured speed-up / FLOP-predicted speed-up over stock. Peak memory: RSS above the level before the "
        "call (warm-up run), weights excluded.",
    ]
    for note in report["notes"]:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


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


def write_outputs(report: dict, out_dir, stem: str = "bench") -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    render_plot(report, paths["png"])
    return paths


# --------------------------------------------------------------------------------------------------------------
# Command line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark stock LLaVA, VisionZip 192/128/64 and TRIM on the same weights",
        description=(
            "Time stock LLaVA, VisionZip at 192/128/64 tokens and TRIM on the same weights, image and prompt: "
            "vision tower, reduction, LM prefill, time to first token, decode, KV cache, peak memory, analytic "
            "prefill FLOPs. Presets use the real LLaVA-1.5 widths with RANDOM weights (cut the depth with "
            "--lm-layers / --vision-layers to fit a CPU); --model benchmarks a local checkpoint. Writes JSON, "
            "a markdown table and a PNG plot."
        ),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b", help="model shape (default: llava-1.5-7b)")
    parser.add_argument("--model", metavar="PATH", help="a local LLaVA / VisionZip / TRIM checkpoint instead of a preset")
    parser.add_argument("--lm-layers", type=int, metavar="N", help="language-model layers (preset default: the real depth)")
    parser.add_argument("--vision-layers", type=int, metavar="N", help="vision-tower layers (preset default: 24)")
    parser.add_argument("--repeats", type=int, default=3, metavar="N", help="timed runs per method (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs per method first (default: 1)")
    parser.add_argument("--new-tokens", type=int, default=8, metavar="N", help="tokens generated per run (default: 8)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (default: the number of CPUs)")
    parser.add_argument("--image", metavar="FILE", help="image (default: the bundled sample picture)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="question asked about the image")
    parser.add_argument("--methods", default="stock,visionzip-192,visionzip-128,visionzip-64,trim",
                        help="comma-separated subset of stock, visionzip-192, visionzip-128, visionzip-64, trim")
    parser.add_argument("--no-attention-comparison", action="store_true",
                        help="skip timing VisionZip's attention the released way (eager, all maps)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--out", metavar="DIR", default="bench-results", help="output directory (default: bench-results)")
    parser.add_argument("--stem", default="bench", help="file name stem of the outputs (default: bench)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from .cli import CommandError

    for name in ("repeats", "new_tokens"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise CommandError("--warmup must be >= 0")
    for name in ("lm_layers", "vision_layers", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    known = {m.name: m for m in DEFAULT_METHODS}
    wanted = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        what = f"unknown method(s) {', '.join(unknown)}" if unknown else "--methods names no method"
        raise CommandError(f"{what}; choose from {', '.join(known)}")
    methods = [known[name] for name in wanted]
    image_path = Path(args.image) if args.image else SAMPLE_IMAGE
    if not image_path.is_file():
        raise CommandError(f"image not found: {image_path}")
    image = Image.open(image_path).convert("RGB")
    if args.model:
        if args.lm_layers or args.vision_layers:
            raise CommandError("--lm-layers / --vision-layers apply to presets only")
        workload = build_checkpoint_workload(args.model, image, args.question, methods, dtype=args.dtype)
    else:
        shape = PRESETS[args.preset]
        if args.lm_layers:
            shape = replace(shape, lm_layers=args.lm_layers)
        if args.vision_layers:
            shape = replace(shape, vision_layers=args.vision_layers)
        print(f"Building {shape.name} with random weights (vision {shape.vision_layers} layers, "
              f"LM {shape.lm_layers} layers)...", flush=True)
        workload = build_preset_workload(shape, image, args.question, methods, seed=args.seed)
        if args.dtype != "float32":
            for model in {id(m): m for m in workload.models.values()}.values():
                model.to(getattr(torch, args.dtype))
            for inputs in workload.inputs.values():
                inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, args.dtype))
        print(RANDOM_WEIGHTS_NOTICE, flush=True)
    report = run_benchmark(
        workload, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
        attention_comparison=not args.no_attention_comparison,
    )
    paths = write_outputs(report, args.out, args.stem)
    print()
    print(render_markdown(report))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
