"""The lmms-eval (0.7.x) model plugin: `--model llava_token_reduction` (any of our checkpoints, or a stock
LLaVA checkpoint unreduced / with `method=`), and `--model llava_<method>` for every method of the registry
(`llava_visionzip`, `llava_trim`, `llava_prumerge`: the same, refusing anything but that method).

Imported by lmms-eval only (through the `lmms_eval.models` entry point, `llava_token_reduction.evaluation:
lmms_eval_manifests`); it imports lmms_eval at module level. The work is done by `batching.ReducedLlavaRunner`.

`--model_args`:
    pretrained=DIR_OR_HUB_ID  (required)        revision=REV          trust_remote_code=True|False
    device=cpu|cuda|cuda:N    dtype=auto|float32|float16|bfloat16     device_map=auto|...
    attn_implementation=sdpa|eager|...
    method=visionzip|prumerge  (reduce a stock checkpoint at load time: any method whose model class takes one)
    trim_question=user_turn|no_format|empty     (which text a question-scoring method, TRIM, scores; default: the
                                                 whole user turn)
    max_new_tokens=N           (default when a task sets none)
    stats_path=FILE.jsonl      (append what the LM saw per sample: read by `evaluation.summary`)
    <config field>=VALUE       (load-time override: dominant_tokens=108,contextual_tokens=20, trim_max_tokens=64,
                                prumerge_plus=True, ...)
"""

import json
import os
from collections import defaultdict

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm

from ..methods import METHODS
from .batching import DEFAULT_MAX_NEW_TOKENS, ChatPrompt, ReducedLlavaRunner, prompt_from_text
from .loading import load_for_evaluation, model_type_of


class _ReducedLlavaBase(lmms):
    """Shared by the chat and simple classes: loading, batching, reports. Subclasses set `expected_method`."""

    expected_method: str | None = None

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        device_map: str | None = None,
        batch_size=1,
        max_batch_size: int | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        method: str | None = None,
        trim_question: str = "user_turn",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stats_path: str | None = None,
        **config_overrides,
    ) -> None:
        super().__init__()
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            raise ValueError("batch_size=auto is not supported: give a number (e.g. --batch_size 8)")
        self.batch_size_per_process = int(batch_size)
        if self.batch_size_per_process < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            # Data parallel: lmms-eval shards the documents by rank; every process holds a whole model.
            device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
            device_map = device
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator
        loaded = load_for_evaluation(
            pretrained, method=method, expected_method=self.expected_method, overrides=config_overrides,
            dtype=dtype, device_map=device_map, trust_remote_code=bool(trust_remote_code), revision=revision,
            attn_implementation=attn_implementation,
        )
        if not device_map:
            loaded.model.to(device)
        self.runner = ReducedLlavaRunner(loaded, device=loaded.model.device if device_map else device,
                                         trim_question=trim_question)
        self.model = loaded.model
        self.default_max_new_tokens = int(max_new_tokens)
        self.stats_path = stats_path
        if stats_path and self._rank == 0:
            self._write_stats({"kind": "model", **model_description(loaded, pretrained, config_overrides)})

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    # -- requests -------------------------------------------------------------------------------------

    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _prompt(self, request) -> ChatPrompt:
        raise NotImplementedError

    def _batches(self, requests, key):
        """Indices of `requests` grouped by `key(request)` (generation options), in chunks of `batch_size`,
        longest prompts first within a group so padding stays small."""
        groups = defaultdict(list)
        for index, request in enumerate(requests):
            groups[key(request)].append(index)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(str(requests[i].args[0])))
            for start in range(0, len(indices), self.batch_size):
                yield indices[start:start + self.batch_size]

    def generate_until(self, requests):
        results = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self._rank != 0, desc="llava_token_reduction generate")
        def options_key(request) -> str:
            return json.dumps(self._gen_kwargs(request), sort_keys=True, default=str)

        for indices in self._batches(requests, key=options_key):
            gen_kwargs = {"max_new_tokens": self.default_max_new_tokens, **self._gen_kwargs(requests[indices[0]])}
            prompts = [self._prompt(requests[i]) for i in indices]
            for index, (text, report) in zip(indices, self.runner.generate(prompts, gen_kwargs)):
                counts = TokenCounts(input_tokens=report.lm_tokens, output_tokens=report.output_tokens)
                results[index] = GenerationResult(text=text, token_counts=counts)
                self._record(requests[index], report)
            progress.update(len(indices))
        progress.close()
        return results

    # Where a generate request carries its generation options: (ctx, doc_to_messages, gen_kwargs, ...) for chat
    # classes, (ctx, gen_kwargs, doc_to_visual, ...) for simple ones.
    gen_kwargs_position: int = 2

    def _gen_kwargs(self, request) -> dict:
        return dict(request.args[self.gen_kwargs_position] or {})

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("multi-round generation is not supported by llava_token_reduction")

    def loglikelihood(self, requests):
        raise NotImplementedError("loglikelihood (multiple choice) needs the simple interface: add --force_simple")

    # -- statistics -----------------------------------------------------------------------------------

    def _record(self, request, report) -> None:
        if not self.stats_path:
            return
        task, doc_id = request.args[-2], request.args[-3]
        self._write_stats({
            "kind": "sample", "task": task, "doc_id": doc_id, "rank": self._rank, "images": report.images,
            "image_tokens": report.image_tokens, "image_placeholders": report.image_placeholders,
            "lm_tokens": report.lm_tokens, "lm_tokens_unreduced": report.lm_tokens_unreduced,
            "output_tokens": report.output_tokens,
        })

    def _write_stats(self, record: dict) -> None:
        path = self.stats_path if self._world_size == 1 else f"{self.stats_path}.rank{self._rank}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def model_description(loaded, pretrained: str, overrides: dict) -> dict:
    """What the summary needs to know about the evaluated model: its method, budget and LM widths."""
    config = loaded.model.config
    text = config.text_config
    return {
        "pretrained": str(pretrained), "model_type": model_type_of(loaded.model),
        "method": loaded.method.name if loaded.method is not None else None,
        # The registry's label with this config's settings: "VisionZip 54+10", "PruMerge+".
        "setting": loaded.method.describe(config) if loaded.method is not None else None,
        "overrides": {k: v for k, v in overrides.items()},
        "lm": {
            "hidden": text.hidden_size, "intermediate": text.intermediate_size, "layers": text.num_hidden_layers,
            "heads": text.num_attention_heads,
            "kv_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            "vocab": text.vocab_size,
        },
    }


class LlavaTokenReductionChat(_ReducedLlavaBase):
    """Chat interface: the task's messages (images as content parts) through the checkpoint's chat template."""

    is_simple = False

    def _prompt(self, request) -> ChatPrompt:
        _, doc_to_messages, _, doc_id, task, split = request.args
        messages = ChatMessages(messages=doc_to_messages(self._doc(task, split, doc_id)))
        images, videos, audios = messages.extract_media()
        if videos or audios:
            raise ValueError("llava_token_reduction evaluates images only; this task has video or audio inputs")
        return ChatPrompt(messages=messages.to_hf_messages(), images=images)


class LlavaTokenReductionSimple(_ReducedLlavaBase):
    """Simple interface (`--force_simple`): a text context plus `doc_to_visual`; also multiple choice."""

    is_simple = True
    gen_kwargs_position = 1

    def _prompt(self, request) -> ChatPrompt:
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual is not None else []
        images = [visual for visual in (visuals or []) if visual is not None]
        if any(isinstance(visual, str) for visual in images):
            raise ValueError("llava_token_reduction evaluates images only; this task gives file paths (videos?)")
        return prompt_from_text(context, images, getattr(self.runner.processor, "image_token", "<image>"))

    def loglikelihood(self, requests):
        """Per request, the mean NLL of the continuation (a loss: lmms-eval picks the smallest) and whether greedy
        decoding gives it. Wrapped in `GenerationResult` because lmms-eval 0.7.3 otherwise turns the tuple
        into a string (EVALUATION.md §2)."""
        results = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self._rank != 0, desc="llava_token_reduction loglikelihood")
        for indices in self._batches(requests, key=lambda r: "loglikelihood"):
            prompts, continuations = [], []
            for i in indices:
                context, target, doc_to_visual, doc_id, task, split = requests[i].args
                if not isinstance(target, str):
                    target = target(self._doc(task, split, doc_id))
                prompts.append(self._prompt(requests[i]))
                continuations.append(target)
            for index, value in zip(indices, self.runner.loglikelihood(prompts, continuations)):
                results[index] = GenerationResult(text=value)
            progress.update(len(indices))
        progress.close()
        return results


# `--model llava_<method>`: the same classes, refusing checkpoints of anything but that method.
def _named(method_name: str, base: type) -> type:
    kind = "Chat" if not base.is_simple else "Simple"
    return type(f"Llava{method_name.title()}{kind}", (base,), {"expected_method": method_name, "__module__": __name__})


for _method in METHODS.values():
    for _base in (LlavaTokenReductionChat, LlavaTokenReductionSimple):
        _class = _named(_method.name, _base)
        globals()[_class.__name__] = _class
