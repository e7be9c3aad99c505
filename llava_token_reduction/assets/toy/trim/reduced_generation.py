"""The one mechanism that runs LLaVA with fewer image tokens than the prompt has placeholders.

Any reduction whose inner `get_image_features` returns one `[k_i, text_hidden]` tensor per image plugs
in unchanged (VisionZip's fixed `k`, TRIM's per-image `k_i`). The flow of `generate`:

    input_ids [B, L] with N placeholders per image, pixel_values [I, C, H, W]
      -> find each image's placeholder span                            (token_compaction.find_image_spans)
      -> reduce the images not yet in the KV cache -> I_new tensors [k_i, text_hidden]
      -> keep k_i placeholders per image, left-align the rows -> [B, C] (token_compaction.compact_rows)
      -> stock `generate` on the compact prompt with the features pre-encoded (`mm_encoder_outputs`)
      -> sequences [B', C + T] -> the prompt as given + the T new tokens: [B', L + T]

Compacting before `generate` (not inside `forward`) keeps generate's own positions, masks, caches and beam
expansion consistent: they all see the compact prompt. The per-row plan rides on the returned KV cache
(`past_key_values.llava_token_reduction_plan`) so that a later turn that passes the whole history and
the same cache reuses the cached image tokens instead of recomputing them.
"""

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .token_compaction import CompactionPlan, compact_rows, find_image_spans


PLAN_ATTRIBUTE = "llava_token_reduction_plan"


def _resolved(name: str, generation_config, kwargs: dict, defaults):
    """The value `generate` will use for a generation option: call kwargs, then the given config, then
    the model's."""
    for source in (kwargs.get(name), getattr(generation_config, name, None), getattr(defaults, name, None)):
        if source is not None:
            return source
    return None


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions over the attended tokens of each row (0 on padding), as generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * (attention_mask != 0)


class ReducedGenerationMixin:
    """`generate` and `forward` for LLaVA models whose images yield fewer tokens than their placeholders.

    Subclasses may list in `image_side_input_names` extra inputs with one row per image that travel with
    `pixel_values` into `self.model.get_image_features` (TRIM's `clip_input_ids`, `clip_attention_mask`).
    """

    image_side_input_names: tuple[str, ...] = ()

    # -- planning ------------------------------------------------------------------------------------

    def _placeholder_sizes(self) -> list[int]:
        """Placeholder counts an image may have in a prompt: the processor's full count, and the reduced
        count when it is fixed (a prompt already expanded to it needs no compaction)."""
        sizes = [self.config.image_seq_length]
        fixed = getattr(self.config, "tokens_per_image", None)
        if fixed is not None:
            sizes.append(fixed)
        return sizes

    def _pop_side_inputs(self, kwargs: dict) -> dict:
        """Take the reduction's per-image inputs out of `kwargs` (stock code must never see them); drop Nones."""
        popped = {name: kwargs.pop(name, None) for name in self.image_side_input_names}
        return {name: value for name, value in popped.items() if value is not None}

    def _pad_token_id(self) -> int:
        for candidate in (self.generation_config.pad_token_id, getattr(self.config, "pad_token_id", None),
                          getattr(self.config.text_config, "pad_token_id", None)):
            if candidate is not None:
                return candidate if isinstance(candidate, int) else int(candidate[0])
        return 0

    def _infer_attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The mask generate would infer: pad tokens are masked unless the pad id is also the EOS id."""
        pad = self.generation_config.pad_token_id
        eos = self.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, (list, tuple)) else [eos]
        if pad is not None and pad not in eos_ids and bool((input_ids == pad).any()):
            return (input_ids != pad).long()
        return torch.ones_like(input_ids)

    def _reduce_and_compact(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values,
        side_inputs: dict,
        cached_plan: CompactionPlan | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[dict, list[torch.Tensor], CompactionPlan]:
        """Reduce the images that are not cached yet and compact the prompt around all of them.

        Everything that can be wrong with the inputs is checked before the vision tower runs.

        Returns:
            the compact `input_ids`, `attention_mask` (and `labels`) `[B, C]`, the new images' features
            (list of `[k_i, text_hidden]`), and the plan of the whole compact batch.
        """
        batch = input_ids.shape[0]
        cached_counts = cached_plan.kept_tokens if cached_plan is not None else [[] for _ in range(batch)]
        if len(cached_counts) != batch:
            raise ValueError(
                f"`past_key_values` holds {len(cached_counts)} rows but `input_ids` has {batch}: pass the history "
                "of the same batch that produced the cache"
            )
        cached_images = sum(len(row) for row in cached_counts)
        given_images = 0 if pixel_values is None else len(pixel_values)
        try:
            spans = find_image_spans(
                input_ids, self.config.image_token_id, self._placeholder_sizes(),
                allowed_totals={given_images, cached_images + given_images},
            )
        except ValueError as error:
            raise ValueError(
                f"{error} `pixel_values` has {given_images} image(s); the cache holds {cached_images}."
            ) from None
        is_new = []
        for row, (row_spans, row_cached) in enumerate(zip(spans, cached_counts)):
            if len(row_spans) < len(row_cached):
                raise ValueError(
                    f"row {row} of `input_ids` has placeholders for {len(row_spans)} image(s) but the cache holds "
                    f"{len(row_cached)}: pass the whole history, with every earlier image's placeholders"
                )
            is_new.extend(index >= len(row_cached) for index in range(len(row_spans)))
        total_images, new_images = len(is_new), sum(is_new)
        if given_images == total_images:  # chat re-templating re-sends the cached images: skip them
            new_rows = torch.tensor([i for i, new in enumerate(is_new) if new], dtype=torch.long)
        elif given_images == new_images:
            new_rows = torch.arange(new_images)
        else:
            raise ValueError(
                f"`input_ids` has placeholders for {total_images} image(s) ({cached_images} already in the cache) "
                f"but `pixel_values` has {given_images}: pass one image per placeholder run"
            )
        for name, value in side_inputs.items():
            if value is None or len(value) != given_images:
                raise ValueError(
                    f"`{name}` must have one row per image ({given_images}), got "
                    f"{'None' if value is None else len(value)}"
                )
        fixed = getattr(self.config, "tokens_per_image", None)
        flat_spans = [span for row in spans for span in row]
        if fixed is not None and any(span.length < fixed for span in flat_spans):
            raise ValueError(f"each image needs at least {fixed} placeholders for its reduced tokens")

        features = []
        if new_images:
            def select(tensor):
                return tensor if len(new_rows) == given_images else tensor[new_rows.to(tensor.device)]

            selected = {name: select(value) for name, value in side_inputs.items()}
            features = list(self.model.get_image_features(pixel_values=select(pixel_values), **selected).pooler_output)

        new_counts = iter(len(feature) for feature in features)
        kept_tokens = [list(row_cached) + [next(new_counts) for _ in row_spans[len(row_cached):]]
                       for row_spans, row_cached in zip(spans, cached_counts)]
        for span, kept in zip(flat_spans, (k for row in kept_tokens for k in row)):
            if kept > span.length:
                raise ValueError(f"an image kept {kept} tokens but its placeholder run has only {span.length}")

        tensors = {"input_ids": input_ids, "attention_mask": attention_mask}
        fills = {"input_ids": self._pad_token_id(), "attention_mask": 0, "labels": -100}
        if labels is not None:
            tensors["labels"] = labels
        compact, padding = compact_rows(tensors, spans, kept_tokens, fills)
        if cached_plan is not None and padding != cached_plan.extra_padding:
            raise NotImplementedError(
                "This batched continuation would change the rows' alignment padding (the new images keep "
                f"different token counts per row: padding {cached_plan.extra_padding} -> {padding}); continue "
                "those rows one at a time"
            )
        return compact, features, CompactionPlan(kept_tokens=kept_tokens, extra_padding=padding)

    # -- generate ------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate` for prompts expanded by the stock LLaVA processor.

        Takes `input_ids` with `image_seq_length` placeholders per image (or already the reduced count
        when it is fixed), `pixel_values` with one image per placeholder run (in order), and the
        reduction's per-image inputs (`image_side_input_names`). Returns sequences whose first
        `input_ids.shape[1]` columns are the prompt as given, exactly like stock LLaVA.

        Multi-turn: pass the whole history (the previous output plus the new turn), `pixel_values` for
        every image in it (or only for the new ones) and the previous `past_key_values`; cached images keep
        their reduced tokens and are not recomputed. `past_key_values.get_seq_length()` counts compact
        positions, and the plan lives on that cache object only.
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        pixel_values = kwargs.pop("pixel_values", None)
        side_inputs = self._pop_side_inputs(kwargs)
        cache = kwargs.get("past_key_values")
        cached_plan = getattr(cache, PLAN_ATTRIBUTE, None)
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            if pixel_values is not None:
                raise ValueError("`pixel_values` need `input_ids` with image placeholders; `inputs_embeds` cannot be compacted")
            return super().generate(input_ids, generation_config, **kwargs)
        has_placeholders = bool((input_ids == self.config.image_token_id).any())
        if pixel_values is None and cached_plan is None and not has_placeholders:
            return super().generate(input_ids, generation_config, **kwargs)  # text only: nothing to compact
        if kwargs.get("position_ids") is not None:
            raise ValueError("`position_ids` cannot be given with images: they are derived from the compacted prompt")

        expand = max(_resolved("num_beams", generation_config, kwargs, self.generation_config) or 1,
                     _resolved("num_return_sequences", generation_config, kwargs, self.generation_config) or 1)
        if cached_plan is not None and expand > 1:
            raise NotImplementedError("beam search / num_return_sequences > 1 cannot continue from `past_key_values`")
        self._convert_lengths_to_new_tokens(input_ids.shape[1], generation_config, kwargs)

        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = self._infer_attention_mask(input_ids)
        compact, features, plan = self._reduce_and_compact(
            input_ids, attention_mask, pixel_values, side_inputs, cached_plan
        )
        compact_ids = compact["input_ids"]
        if cached_plan is not None and cached_plan.compact_ids is not None:
            self._check_history_matches_cache(compact_ids, cached_plan, cache)
        if features:
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}

        output = super().generate(
            input_ids=compact_ids, attention_mask=compact["attention_mask"], generation_config=generation_config, **kwargs
        )
        sequences = output.sequences if isinstance(output, ModelOutput) else output
        rows_per_prompt = sequences.shape[0] // input_ids.shape[0]
        plan = plan.repeat_rows(rows_per_prompt)
        plan.compact_ids = sequences
        new_tokens = sequences[:, compact_ids.shape[1]:]
        full = torch.cat([input_ids.to(new_tokens.device).repeat_interleave(rows_per_prompt, dim=0), new_tokens], dim=1)
        returned_cache = cache if cache is not None else getattr(output, "past_key_values", None)
        if returned_cache is not None:
            setattr(returned_cache, PLAN_ATTRIBUTE, plan)
        if isinstance(output, ModelOutput):
            output.sequences = full
            return output
        return full

    def _convert_lengths_to_new_tokens(self, prompt_length: int, generation_config, kwargs: dict) -> None:
        """`max_length`/`min_length` count the prompt as given; generate will see the shorter compact one,
        so turn explicit total lengths into new-token counts."""
        if _resolved("max_new_tokens", generation_config, kwargs, self.generation_config) is None:
            max_length = _resolved("max_length", generation_config, kwargs, self.generation_config)
            if max_length is not None:
                if max_length <= prompt_length:
                    raise ValueError(
                        f"`max_length` ({max_length}) must exceed the prompt's length ({prompt_length}); "
                        "better, set `max_new_tokens`"
                    )
                kwargs["max_new_tokens"] = max_length - prompt_length
        if _resolved("min_new_tokens", generation_config, kwargs, self.generation_config) is None:
            min_length = _resolved("min_length", generation_config, kwargs, self.generation_config)
            if min_length:
                kwargs["min_new_tokens"] = max(0, min_length - prompt_length)

    @staticmethod
    def _check_history_matches_cache(compact_ids: torch.Tensor, cached_plan: CompactionPlan, cache) -> None:
        cached_length = cache.get_seq_length()
        cached_ids = cached_plan.compact_ids[:, :cached_length].to(compact_ids.device)
        if compact_ids.shape[1] <= cached_length or not torch.equal(compact_ids[:, :cached_length], cached_ids):
            raise ValueError(
                "`input_ids` must start with the whole history the cache was built from (the previous `generate` "
                "output, unchanged) followed by the new turn"
            )

    # -- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        labels=None,
        logits_to_keep=0,
        image_sizes=None,
        mm_encoder_outputs=None,
        **kwargs,
    ):
        """Stock LLaVA `forward`, plus: given `pixel_values` and a prompt with full placeholder runs, the
        images are reduced and `input_ids`, `attention_mask` and `labels` are compacted alike (labels
        padded with -100), with positions contiguous over the attended tokens. Logits, loss and hidden
        states then refer to the compact sequence (`[B, C, vocab]`)."""
        side_inputs = self._pop_side_inputs(kwargs)
        cache_is_empty = past_key_values is None or past_key_values.get_seq_length() == 0
        if pixel_values is not None and mm_encoder_outputs is None:
            if input_ids is None:
                raise ValueError("`pixel_values` need `input_ids` with image placeholders; `inputs_embeds` cannot be compacted")
            if not cache_is_empty:
                raise NotImplementedError("`forward` with `pixel_values` and a filled cache is not supported; use `generate`")
            if position_ids is not None:
                raise ValueError("`position_ids` cannot be given with images: they are derived from the compacted prompt")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            compact, features, _ = self._reduce_and_compact(
                input_ids, attention_mask, pixel_values, side_inputs, labels=labels
            )
            input_ids, attention_mask, labels = compact["input_ids"], compact["attention_mask"], compact.get("labels")
            if not bool(attention_mask.all()):
                position_ids = positions_from_mask(attention_mask)
            mm_encoder_outputs = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        elif (mm_encoder_outputs is None and cache_is_empty and input_ids is not None
              and bool((input_ids == self.config.image_token_id).any())):
            raise ValueError(
                "`input_ids` contains image placeholders but no `pixel_values` were given: image placeholders are "
                "never fed to the language model as text"
            )
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
            logits_to_keep=logits_to_keep, mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )
