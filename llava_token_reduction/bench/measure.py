"""Measuring one `generate` call piece by piece with forward hooks on the model's own modules, and the cost
of obtaining VisionZip's attention the released way (eager, every map) next to ours (sdpa + hooks)."""

import contextlib
import ctypes
import os
import statistics
import threading
import time


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


class CudaPeak:
    """Peak CUDA memory allocated on `device` above what was allocated at entry (the weights and inputs), from
    the caching allocator's own statistics (`reset_peak_memory_stats`, `max_memory_allocated`): activations,
    KV cache and temporaries, not the weights nor the allocator's reserved-but-free blocks."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.baseline = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.baseline
        return False


def memory_meter(device):
    """The peak-memory meter of `device`: `CudaPeak` on a GPU, `PeakRSS` (the process) on the CPU."""
    return CudaPeak(device) if getattr(device, "type", device) == "cuda" else PeakRSS()


def clock_of(device):
    """A `perf_counter` reading that is honest on `device`: on a GPU the queued kernels are waited for first
    (`torch.cuda.synchronize`), so a span covers the work and not only its launch. Nothing CUDA runs otherwise."""
    if getattr(device, "type", device) != "cuda":
        return time.perf_counter
    import torch

    def now():
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


def model_device(model):
    """The device of `model`'s vision tower (where `generate` starts)."""
    return next(model.model.vision_tower.parameters()).device


class _Stopwatch:
    """Forward pre/post hooks that record `clock` spans of named modules, removed on exit. A name may stand for
    a tuple of modules called one after another (never nested): its spans are theirs, in call order."""

    def __init__(self, modules: dict, clock=time.perf_counter):
        self.clock = clock
        self.modules = {name: module if isinstance(module, tuple) else (module,)
                        for name, module in modules.items() if module is not None}
        self.spans = {name: [] for name in self.modules}
        self._handles = []

    def __enter__(self):
        for name, modules in self.modules.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._pre(name)))
                self._handles.append(module.register_forward_hook(self._post(name)))
        return self

    def _pre(self, name):
        def hook(module, args):
            self.spans[name].append([self.clock(), None])

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self.spans[name][-1][1] = self.clock()

        return hook

    def total(self, name) -> float:
        return sum(end - start for start, end in self.spans.get(name, []))

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False


class _VisionWork:
    """Forward pre-hooks that count what the vision tower and the projector did in one call: the crops through
    the tower (rows of the pixel batch its embeddings got), the encoder layers that ran (a tower cut short of
    its last layer runs fewer: `modeling/vision_inputs.py`) and the tokens the projector mapped. Towers other
    than CLIP (one piece, `vision_tower_pieces`) are counted at their configured depth. Removed on exit."""

    def __init__(self, tower, projector):
        from ..modeling.vision_inputs import vision_tower_pieces

        pieces = vision_tower_pieces(tower)
        self.entry = pieces[0]
        self.layers = pieces[2:] if len(pieces) > 2 else ()
        self.projector = projector
        self.crops = 0
        self.layers_called = set()
        self.projected_tokens = 0
        self.configured_layers = tower.config.num_hidden_layers
        self._handles = []

    def __enter__(self):
        def entry(module, args):
            self.crops += int(args[0].shape[0])

        def projector(module, args):
            self.projected_tokens += int(args[0].numel() // args[0].shape[-1])

        self._handles.append(self.entry.register_forward_pre_hook(entry))
        self._handles.append(self.projector.register_forward_pre_hook(projector))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(lambda m, a, i=index: self.layers_called.add(i)))
        return self

    @property
    def layers_run(self) -> int:
        return len(self.layers_called) if self.layers else self.configured_layers

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


# Modules that `get_image_features` runs first: the vision tower, and a question tower where the method has one.
_FEATURE_ENTRY_MODULES = ("text_tower", "vision")


def _cache_of(output):
    """The cache of a language-model output: `cache` since transformers 5.24 (`past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def measure_generate(model, inputs: dict, new_tokens: int, with_memory: bool = False) -> dict:
    """One `generate` call with `new_tokens` new tokens, timed piece by piece (see the package docstring).

    Only forward hooks are added (and removed on exit); the model's methods are left alone. The image-feature
    span runs from the first of the towers starting to the projector finishing, so `reduction_ms` (that span
    minus the vision tower and the projector) is everything the method adds between them. On a GPU every
    reading waits for the queued kernels first (`clock_of`) and the memory is the allocator's peak (`CudaPeak`).

    Also returned: the language model's prefill input as it ran (`prefill_tokens` positions per row,
    `prefill_row_tokens` of them attended in each row, the rest left padding), the KV-cache bytes
    after the prefill, from the cache's tensors, and what the vision side did (`_VisionWork`): `vision_crops`
    through the tower, `vision_layers_run`, `projected_tokens`, for the FLOP count of the call."""
    import torch

    from ..modeling.vision_inputs import vision_tower_pieces

    device = model_device(model)
    clock = clock_of(device)
    inner = model.model
    watched = {
        # The pieces, not the tower module: a run cut short of the last layer skips the tower's own forward.
        "vision": vision_tower_pieces(inner.vision_tower),
        "projector": inner.multi_modal_projector,
        "text_tower": getattr(inner, "clip_text_model", None),
        "lm": inner.language_model,
        "head": model.lm_head,
    }
    kv_bytes = {}

    def remember_cache(module, args, kwargs, output):
        if "bytes" not in kv_bytes:
            kv_bytes["bytes"] = kv_cache_bytes(_cache_of(output))
            embeds = kwargs.get("inputs_embeds")
            batch, positions = (embeds if embeds is not None else kwargs["input_ids"]).shape[:2]
            kv_bytes["tokens"] = int(positions)
            mask = kwargs.get("attention_mask")
            rows = mask.sum(dim=1).tolist() if mask is not None and mask.dim() == 2 else [positions] * batch
            kv_bytes["row_tokens"] = [int(n) for n in rows]

    cache_hook = inner.language_model.register_forward_hook(remember_cache, with_kwargs=True)
    memory = memory_meter(device) if with_memory else contextlib.nullcontext()
    try:
        with (_Stopwatch(watched, clock) as watch, _VisionWork(inner.vision_tower, inner.multi_modal_projector) as work,
              memory, torch.inference_mode()):
            start = clock()
            output = model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            )
            end = clock()
    finally:
        cache_hook.remove()
    head_ends = [span[1] for span in watch.spans["head"]]
    lm_spans = watch.spans["lm"]
    vision_ms = 1000 * watch.total("vision")
    projector_ms = 1000 * watch.total("projector")
    text_tower_ms = 1000 * watch.total("text_tower")
    feature_start = min(watch.spans[name][0][0] for name in _FEATURE_ENTRY_MODULES if watch.spans.get(name))
    features_ms = 1000 * (watch.spans["projector"][-1][1] - feature_start)
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
        "prefill_row_tokens": kv_bytes.get("row_tokens"),
        "batch": int(inputs["input_ids"].shape[0]),
        "kv_cache_bytes": kv_bytes.get("bytes"),
        "new_tokens": int(output.shape[1] - inputs["input_ids"].shape[1]),
        "vision_crops": work.crops,
        "vision_layers_run": work.layers_run,
        "projected_tokens": work.projected_tokens,
    }
    if with_memory:
        result["peak_memory_bytes"] = memory.peak_bytes
    return result


def image_feature_inputs(model, inputs: dict) -> dict:
    """The part of `inputs` that `get_image_features` takes: the pixels, the method's per-image inputs
    (`image_side_input_names`) and, where its signature has it (stock LLaVA-NeXT), `image_sizes`."""
    import inspect

    names = ["pixel_values", *getattr(model, "image_side_input_names", ())]
    if "image_sizes" in inspect.signature(model.model.get_image_features).parameters:
        names.append("image_sizes")
    return {name: inputs[name] for name in dict.fromkeys(names) if name in inputs}


def image_tokens_kept(model, inputs: dict) -> int:
    """Image tokens the language model sees (the first image)."""
    import torch

    with torch.inference_mode():
        features = model.model.get_image_features(**image_feature_inputs(model, inputs))
    pooled = features.pooler_output
    return int(pooled[0].shape[0]) if isinstance(pooled, (list, tuple)) else int(pooled.shape[-2])


def measure_attention_acquisition(model, pixel_values, with_memory: bool = False, **image_inputs) -> dict:
    """Time (and optionally peak memory) of getting layer ℓ's CLS attention, head-mean keys and output.

    `ours`: the sdpa tower, layer ℓ's input and output from transformers' output capture, its keys and CLS query
    recomputed, then the CLS row only (`get_visionzip_layer_outputs`, the shipped code path). `released`: the
    tower switched to eager attention with `output_attentions=True` and `output_hidden_states=True` (every
    layer's `[H, N, N]` map materialised, as the released code runs it), the CLS row summed over heads from the
    maps and the keys from a hook. Both on the same tower and crops: one image of `pixel_values`, LLaVA-NeXT's
    `[1, crops, C, H, W]` (with `image_sizes` among `image_inputs`) run as its `crops` crops.
    """
    import torch

    from ..modeling.modeling_reduced_llava import capture_outputs_of

    config = model.config
    tower = model.model.vision_tower
    layer_index = config.visionzip_layer
    layer = tower.encoder.layers[layer_index]
    heads = config.vision_config.num_attention_heads
    results = {}

    crops = pixel_values.flatten(0, 1) if pixel_values.dim() == 5 else pixel_values  # one image: every crop real

    def ours():
        model.model.get_visionzip_layer_outputs(pixel_values, **image_inputs)
        return {"attention_map_bytes": 0}

    def released():
        previous = tower.config._attn_implementation
        tower.set_attn_implementation("eager")
        try:
            with capture_outputs_of({"k": layer.self_attn.k_proj}) as got:
                out = tower(crops, output_attentions=True, output_hidden_states=True, return_dict=True)
            attention = out.attentions[layer_index]
            attention[:, :, 0].sum(dim=1)  # the CLS row, summed over heads
            batch, tokens, _ = got["k"].shape
            got["k"].view(batch, tokens, heads, -1).mean(dim=2)  # the head-mean keys
            return {"attention_map_bytes": sum(a.nbytes for a in out.attentions)}
        finally:
            tower.set_attn_implementation(previous)

    device = model_device(model)
    clock = clock_of(device)
    for name, run in (("ours_sdpa_hooks", ours), ("released_eager_all_maps", released)):
        memory = memory_meter(device) if with_memory else contextlib.nullcontext()
        with memory, torch.inference_mode():
            start = clock()
            info = run()
            elapsed = clock() - start
        results[name] = {"ms": 1000 * elapsed, **info}
        if with_memory:
            results[name]["peak_memory_bytes"] = memory.peak_bytes
    return results
