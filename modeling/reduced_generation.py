"""The one mechanism that runs LLaVA with fewer image tokens than the prompt has placeholders.

Any reduction whose inner `get_image_features` returns one `[k_i, text_hidden]` tensor per image plugs
in unchanged (VisionZip's fixed `k`, TRIM's per-image `k_i`). The flow of `generate`:

    input_ids [B, L] with N_i placeholders for image i, pixel_values [I, C, H, W]
      -> N_i from each image's pixels, as the processor counts them    (image_placeholder_counts)
      -> find each image's placeholder span                            (token_compaction.assign_image_spans)
      -> reduce the images not yet in the KV cache -> I_new tensors [k_i, text_hidden]
      -> keep k_i placeholders per image, left-align the rows -> [B, C] (token_compaction.compact_rows)
      -> stock `generate` on the compact prompt with the features pre-encoded (`mm_encoder_outputs`)
      -> sequences [B', C + T] -> the prompt as given + the T new tokens: [B', L + T]

Compacting before `generate` (not inside `forward`) keeps generate's own positions, masks, caches and beam
expansion consistent: they all see the compact prompt. The per-row plan rides on the returned KV cache
(`cache.llava_token_reduction_plan`) so that a later turn that passes the whole history and the same
cache reuses the cached image tokens instead of recomputing them. The compaction itself is shared with the
inner models (`reduced_inputs.ReducedInputsMixin`).
"""

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .reduced_inputs import TEXT_ONLY_ATTRIBUTE, ReducedInputsMixin, cached_length
from .token_compaction import CompactionPlan


PLAN_ATTRIBUTE = "llava_token_reduction_plan"


def _resolved(name: str, generation_config, kwargs: dict, defaults):
    """The value `generate` will use for a generation option: call kwargs, then the given config, then
    the model's."""
    for source in (kwargs.get(name), getattr(generation_config, name, None), getattr(defaults, name, None)):
        if source is not None:
            return source
    return None


class ReducedGenerationMixin(ReducedInputsMixin):
    """`generate` and `forward` for LLaVA models whose images yield fewer tokens than their placeholders.

    The reduction's per-image inputs (`image_side_input_names`) are the named parameters of the inner
    model's `get_image_features` (TRIM's `clip_input_ids`, `clip_attention_mask`); they travel with
    `pixel_values`.
    """

    @classmethod
    def _feature_model_class(cls) -> type | None:
        return getattr(cls, "inner_model_class", None)

    def _feature_model(self):
        return self.model

    def _infer_attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The mask generate would infer: pad tokens are masked unless the pad id is also the EOS id."""
        pad = self.generation_config.pad_token_id
        eos = self.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, (list, tuple)) else [eos]
        if pad is not None and pad not in eos_ids and bool((input_ids == pad).any()):
            return (input_ids != pad).long()
        return torch.ones_like(input_ids)

    # -- generate ------------------------------------------------------------------------------------

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate` for prompts expanded by the stock LLaVA processor.

        Takes `input_ids` with each image's placeholders as the processor expands them (or already the
        reduced count when it is fixed), `pixel_values` with one image per placeholder run (in order), and
        the reduction's per-image inputs (`image_side_input_names`). Returns sequences whose first
        `input_ids.shape[1]` columns are the prompt as given, exactly like stock LLaVA.

        Multi-turn: pass the whole history (the previous output plus the new turn), `pixel_values` for
        every image in it (or only for the new ones) and the previous `cache` (`out.cache`; the deprecated
        alias `past_key_values=` works while transformers accepts it); cached images keep their reduced
        tokens and are not recomputed. `cache.get_seq_length()` counts compact positions, and the plan lives
        on that cache object only. A history that leaves the cached one after its last image (an edited
        reply) rewinds the cache to where they part.
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        pixel_values = kwargs.pop("pixel_values", None)
        side_inputs = self._pop_side_inputs(kwargs)
        cache = kwargs.get("cache")
        cached_plan = getattr(cache, PLAN_ATTRIBUTE, None)
        if input_ids is None or kwargs.get("inputs_embeds") is not None:
            if pixel_values is not None:
                raise ValueError(
                    "`pixel_values` need `input_ids` with image placeholders; `inputs_embeds` cannot be compacted"
                )
            return super().generate(input_ids, generation_config, **kwargs)
        if kwargs.get("mm_encoder_outputs") is not None and pixel_values is None and cached_plan is None:
            # Features encoded by the caller (or by the main model of assisted generation): the prompt already
            # has one placeholder per feature row, as stock LLaVA requires.
            if _resolved("is_assistant", generation_config, kwargs, self.generation_config):
                # transformers withholds multimodal inputs from an assistant's forward (its drafts are text-only,
                # as with a stock LLaVA assistant): the cache of this call tells forward to read placeholders as
                # text. Per call, so concurrent calls do not see each other's mark.
                if cache is None:
                    kwargs["cache"] = cache = DynamicCache(config=self.config.get_text_config(decoder=True))
                setattr(cache, TEXT_ONLY_ATTRIBUTE, True)
            return super().generate(input_ids, generation_config, **side_inputs, **kwargs)
        has_placeholders = bool((input_ids == self.config.image_token_id).any())
        if pixel_values is None and cached_plan is None and not has_placeholders:
            return super().generate(input_ids, generation_config, **kwargs)  # text only: nothing to compact

        expand = max(_resolved("num_beams", generation_config, kwargs, self.generation_config) or 1,
                     _resolved("num_return_sequences", generation_config, kwargs, self.generation_config) or 1)
        if cached_plan is not None and expand > 1:
            raise NotImplementedError("beam search / num_return_sequences > 1 cannot continue from a `cache`")
        self._convert_lengths_to_new_tokens(input_ids.shape[1], generation_config, kwargs)

        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = self._infer_attention_mask(input_ids)
        position_ids = kwargs.pop("position_ids", None)
        if position_ids is not None and not self._are_default_positions(position_ids, attention_mask):
            raise ValueError(
                "`position_ids` cannot be given with images: they are derived from the compacted prompt (only the "
                "default positions, `cumsum(attention_mask) - 1`, are accepted, and recomputed)"
            )
        compact, features, plan = self._reduce_and_compact(
            input_ids, attention_mask, pixel_values, side_inputs, cached_plan
        )
        compact_ids = compact["input_ids"]
        if cached_plan is not None and cached_plan.compact_ids is not None:
            self._align_cache_with_history(compact_ids, cached_plan, cache)
        if features:
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}

        output = super().generate(
            input_ids=compact_ids, attention_mask=compact["attention_mask"], generation_config=generation_config,
            **kwargs,
        )
        sequences = output.sequences if isinstance(output, ModelOutput) else output
        rows_per_prompt = sequences.shape[0] // input_ids.shape[0]
        plan = plan.repeat_rows(rows_per_prompt)
        plan.compact_ids = sequences
        new_tokens = sequences[:, compact_ids.shape[1]:]
        full = torch.cat([input_ids.to(new_tokens.device).repeat_interleave(rows_per_prompt, dim=0), new_tokens], dim=1)
        returned_cache = cache if cache is not None else getattr(output, "cache", None)
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
    def _align_cache_with_history(compact_ids: torch.Tensor, cached_plan: CompactionPlan, cache) -> None:
        """Check that the compact history repeats what the cache holds; where it leaves the cached tokens
        after the last cached image (an edited reply), crop the cache back to the common prefix."""
        length = cached_length(cache)
        cached_ids = cached_plan.compact_ids[:, :length].to(compact_ids.device)
        common = min(length, compact_ids.shape[1] - 1, cached_ids.shape[1])
        if common > 0:
            differs = (compact_ids[:, :common] != cached_ids[:, :common]).any(dim=0).nonzero()
            common = int(differs[0, 0]) if len(differs) else common
        if (common < cached_plan.images_end or compact_ids.shape[1] <= common
                or (common < length and not hasattr(cache, "crop"))):
            raise ValueError(
                "`input_ids` must start with the whole history the cache was built from (the previous `generate` "
                "output, unchanged at least up to its last image) followed by the new turn"
            )
        if common < length:
            cache.crop(common - length)

    # -- forward -------------------------------------------------------------------------------------

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
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
        states then refer to the compact sequence (`[B, C, vocab]`). With a filled `cache` (decoding) the
        input is ordinary tokens, a generated placeholder id included, as in stock LLaVA."""
        # `image_sizes` is a named stock parameter: a family's per-image input must not be swallowed by it.
        side_inputs = self._pop_side_inputs(kwargs, image_sizes=image_sizes)
        image_sizes = kwargs.pop("image_sizes", None)
        if pixel_values is not None and mm_encoder_outputs is None:
            compacted = self._compact_forward_inputs(
                input_ids, pixel_values, attention_mask, position_ids, cache, side_inputs, labels=labels
            )
            input_ids, attention_mask = compacted["input_ids"], compacted["attention_mask"]
            position_ids, labels = compacted["position_ids"], compacted["labels"] if labels is not None else None
            mm_encoder_outputs = compacted["mm_encoder_outputs"]
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, labels=labels, logits_to_keep=logits_to_keep,
            image_sizes=image_sizes, mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )
