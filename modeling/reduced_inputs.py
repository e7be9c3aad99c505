"""The half of the mechanism that the inner and the outer models share: stock-processor prompts in, compact
prompts and reduced image features out.

The stock LLaVA processor expands each `<image>` into `N_i` placeholders, computed from that image's pixels
(`image_placeholder_counts`, owned by the model family). A reduction keeps `k_i <= N_i` tokens per image.
`_reduce_and_compact` checks everything, reduces the images that are not cached yet and drops the unused
placeholders (`token_compaction`); `_compact_forward_inputs` does it for a direct `forward` call, where
`attention_mask`, `position_ids` and `labels` follow the compact sequence.

The bookkeeping is host-side Python and numpy; under `torch.compile` it runs outside the graph
(`torch.compiler.disable`), and nothing of it runs in a decoding step.
"""

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import is_torchdynamo_compiling

from .token_compaction import CompactionPlan, assign_image_spans, compact_rows, placeholder_runs


# Set on the cache of a call whose image placeholders are text on purpose: an assistant in assisted generation,
# from whose forward transformers withholds the images.
TEXT_ONLY_ATTRIBUTE = "llava_token_reduction_placeholders_are_text"


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions over the attended tokens of each row (0 on padding), as generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * (attention_mask != 0)


def cached_length(cache) -> int:
    """Tokens the cache holds (0 for None); a plain int also for caches that count in a tensor (static)."""
    return 0 if cache is None else int(cache.get_seq_length())


class ReducedInputsMixin:
    """Compaction of stock-processor prompts around reduced images, for a model whose `_feature_model()`
    (itself for the inner model, `self.model` for the outer one) has `get_image_features` returning one
    `[k_i, text_hidden]` tensor per image and `image_placeholder_counts`."""

    # Inputs with one row per image that travel with `pixel_values` into `get_image_features` (TRIM's
    # `clip_input_ids`, `clip_attention_mask`): declared by the method (`method_base.ReductionMethodMixin`) on the
    # inner model and copied to the outer class, whose generate picks them out of its kwargs. A plain tuple:
    # `forward` reads it, also under torch.compile.
    image_side_input_names: tuple[str, ...] = ()
    # The family's own per-image inputs (LLaVA-NeXT's `image_sizes`), joined to the method's on every inner model
    # class: both travel with `pixel_values`, one row per image, and are selected with the new images.
    family_side_input_names: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        feature_class = cls._feature_model_class()
        if "image_side_input_names" not in cls.__dict__ and feature_class not in (None, cls):
            cls.image_side_input_names = tuple(getattr(feature_class, "image_side_input_names", ()))
        elif feature_class is cls and cls.family_side_input_names:
            cls.image_side_input_names = tuple(dict.fromkeys((*cls.image_side_input_names,
                                                              *cls.family_side_input_names)))

    @classmethod
    def _feature_model_class(cls) -> type | None:
        return cls

    def _feature_model(self):
        return self

    def _pop_side_inputs(self, kwargs: dict, **named) -> dict:
        """Take the reduction's per-image inputs out of `kwargs` (stock code must never see them); drop Nones.
        `named` are stock `forward` parameters that a family may declare a side input (LLaVA-NeXT's
        `image_sizes`): returned among the side inputs when they are one, else put back into `kwargs`."""
        kwargs.update(named)
        popped = {name: kwargs.pop(name, None) for name in self.image_side_input_names}
        return {name: value for name, value in popped.items() if value is not None}

    def _pad_token_id(self) -> int:
        generation_config = getattr(self, "generation_config", None)
        for candidate in (getattr(generation_config, "pad_token_id", None), getattr(self.config, "pad_token_id", None),
                          getattr(self.config.text_config, "pad_token_id", None)):
            if candidate is not None:
                return candidate if isinstance(candidate, int) else int(candidate[0])
        return 0

    def _find_spans(self, input_ids, pixel_values, side_inputs, cached_plan):
        """Each image's placeholder span per row, which images are new, and the given images' counts.

        Two readings of `pixel_values` are tried: every image of the prompt (chat re-templating re-sends the
        cached ones), or only the images not in the cache. Each image is cut at the count the processor gave
        it, or at the model's fixed reduced count (a prompt already expanded to it)."""
        batch = input_ids.shape[0]
        cached_counts = cached_plan.placeholder_counts if cached_plan is not None else [[] for _ in range(batch)]
        if len(cached_counts) != batch:
            raise ValueError(
                f"`cache` holds {len(cached_counts)} rows but `input_ids` has {batch}: pass the history "
                "of the same batch that produced the cache"
            )
        given = [] if pixel_values is None else list(
            self._feature_model().image_placeholder_counts(pixel_values, **side_inputs)
        )
        runs = placeholder_runs(input_ids, self.config.image_token_id)
        fixed = getattr(self.config, "tokens_per_image", None)
        readings = [given] + ([[fixed] * len(given)] if fixed is not None else [])
        for counts in readings:
            if any(cached_counts):  # only the new images given
                spans = assign_image_spans(runs, cached_counts, counts)
                if spans is not None:
                    return spans, [i >= len(c) for row, c in zip(spans, cached_counts) for i in range(len(row))], given
            spans = assign_image_spans(runs, [[] for _ in range(batch)], counts)
            if spans is not None:
                is_new = [i >= len(c) for row, c in zip(spans, cached_counts) for i in range(len(row))]
                for row, (row_spans, row_cached) in enumerate(zip(spans, cached_counts)):
                    if len(row_spans) < len(row_cached):
                        raise ValueError(
                            f"row {row} of `input_ids` has placeholders for {len(row_spans)} image(s) but the cache "
                            f"holds {len(row_cached)}: pass the whole history, with every earlier image's placeholders"
                        )
                return spans, is_new, given
        found = [sum(run.length for run in row) for row in runs]
        cached = sum(len(row) for row in cached_counts)
        expected = "" if fixed is None else f" (or {fixed} each, the reduced count)"
        raise ValueError(
            f"The image placeholders in `input_ids` (token id {self.config.image_token_id}, counts per row {found}) "
            f"do not match the images: `pixel_values` has {len(given)} image(s) needing {given} placeholders"
            f"{expected}, one run per image in order, as the LLaVA processor expands `<image>`; the cache holds "
            f"{cached} image(s)."
        )

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
        for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
            if tensor is not None and tuple(tensor.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"`{name}` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(tensor.shape)}"
                )
        spans, is_new, given = self._find_spans(input_ids, pixel_values, side_inputs, cached_plan)
        total_images, new_images, given_images = len(is_new), sum(is_new), len(given)
        if given_images == total_images:  # chat re-templating re-sends the cached images: skip them
            new_rows = torch.tensor([i for i, new in enumerate(is_new) if new], dtype=torch.long)
        else:  # _find_spans matched only the new images
            new_rows = torch.arange(new_images)
        for name, value in side_inputs.items():
            if len(value) != given_images:
                raise ValueError(f"`{name}` must have one row per image ({given_images}), got {len(value)}")
        fixed = getattr(self.config, "tokens_per_image", None)
        flat_spans = [span for row in spans for span in row]
        if fixed is not None and any(span.length < fixed for span in flat_spans):
            raise ValueError(f"each image needs at least {fixed} placeholders for its reduced tokens")

        features = []
        if new_images:
            def select(tensor):
                return tensor if len(new_rows) == given_images else tensor[new_rows.to(tensor.device)]

            if isinstance(pixel_values, (list, tuple)):
                if len(new_rows) != given_images:
                    pixel_values = [pixel_values[i] for i in new_rows.tolist()]
            else:
                pixel_values = select(pixel_values)
            selected = {name: select(value) for name, value in side_inputs.items()}
            output = self._feature_model().get_image_features(
                pixel_values=pixel_values, return_dict=True, **selected  # whatever config.return_dict says
            )
            features = list(output.pooler_output)

        new_counts = iter(len(feature) for feature in features)
        cached_kept = cached_plan.kept_tokens if cached_plan is not None else [[] for _ in spans]
        kept_tokens = [list(row_cached) + [next(new_counts) for _ in row_spans[len(row_cached):]]
                       for row_spans, row_cached in zip(spans, cached_kept)]
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
        image_columns = (compact["input_ids"] == self.config.image_token_id).any(dim=0).nonzero()
        plan = CompactionPlan(kept_tokens=kept_tokens, extra_padding=padding,
                              placeholder_counts=[[span.length for span in row] for row in spans],
                              images_end=int(image_columns[-1, 0]) + 1 if len(image_columns) else 0)
        return compact, features, plan

    @torch.compiler.disable
    def _compact_forward_inputs(self, input_ids, pixel_values, attention_mask, position_ids, cache, side_inputs,
                                labels=None) -> dict:
        """For a direct `forward` with `pixel_values`: reduce the images and compact the prompt (and `labels`,
        padded with -100); positions become contiguous over the attended compact tokens. Host-side, so it
        runs outside a compiled graph.

        Returns the keyword arguments for stock `forward`: `input_ids`, `attention_mask`, `position_ids`,
        `mm_encoder_outputs` (and `labels`)."""
        if input_ids is None:
            raise ValueError(
                "`pixel_values` need `input_ids` with image placeholders; `inputs_embeds` cannot be compacted"
            )
        if cached_length(cache):
            raise NotImplementedError(
                "`forward` with `pixel_values` and a filled cache is not supported; use `generate`"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is not None and not self._are_default_positions(position_ids, attention_mask):
            raise ValueError(
                "`position_ids` cannot be given with images: they are derived from the compacted prompt (only the "
                "default positions, `cumsum(attention_mask) - 1`, are accepted, and recomputed)"
            )
        compact, features, _ = self._reduce_and_compact(input_ids, attention_mask, pixel_values, side_inputs,
                                                        labels=labels)
        compact_mask = compact["attention_mask"]
        result = {
            "input_ids": compact["input_ids"],
            "attention_mask": compact_mask,
            "position_ids": None if bool(compact_mask.all()) else positions_from_mask(compact_mask),
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)},
        }
        if labels is not None:
            result["labels"] = compact["labels"]
        return result

    @staticmethod
    def _are_default_positions(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        """Whether `position_ids` are what generate derives from the mask (assisted generation passes them);
        padding positions are not compared (implementations put 0 or 1 there)."""
        if position_ids.shape[-1] != attention_mask.shape[-1]:
            return False
        expected = positions_from_mask(attention_mask).to(position_ids.device)
        attended = attention_mask.to(position_ids.device) != 0
        return bool((position_ids.expand_as(expected) == expected)[attended].all())

    def _refuse_placeholders_without_images(self, input_ids, cache) -> None:
        """Image placeholders are never fed to the language model as text at the start of a sequence. While
        decoding (a filled cache) a generated placeholder id is an ordinary token, as in stock LLaVA, and so are
        the placeholders an assisted-generation assistant gets without their images; under `torch.compile` the
        check is left out of the graph (it would depend on the data)."""
        if input_ids is None or is_torchdynamo_compiling() or getattr(cache, TEXT_ONLY_ATTRIBUTE, False):
            return
        if cached_length(cache):
            return
        if bool((input_ids == self.config.image_token_id).any()):
            raise ValueError(
                "`input_ids` contains image placeholders but no `pixel_values` were given: image placeholders are "
                "never fed to the language model as text"
            )
