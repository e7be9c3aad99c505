"""Each method's own model-card fields (`FamilyClasses.card_fields_function`, one per method and model family): the
placeholders of its template in `model_cards/` besides `COMMON_CARD_FIELDS`, plus the common `title` and `intro`.

A function takes the checkpoint's config and a `model_card.CardContext` and returns a dict; `render_model_card`
checks that it filled every field the registry entry lists.
"""

# The budgets the VisionZip paper reports (docs/visionzip.md §7): (dominant, contextual) -> tokens per image.
PUBLISHED_VISIONZIP_BUDGETS = {(54, 10): 64, (108, 20): 128, (162, 30): 192}


def visionzip_card_fields(config, context) -> dict:
    published = PUBLISHED_VISIONZIP_BUDGETS.get((config.dominant_tokens, config.contextual_tokens))
    if published:
        budget_note = (f"This checkpoint's default budget, {config.tokens_per_image} tokens per image, is one of the "
                       f"published ones: see the rows \"VisionZip {published}\""
                       + (" and \"VisionZip‡ " + str(published) + "\" (tuned projector)."
                          if context.tuned_projector else "."))
    else:
        budget_note = (f"This checkpoint's default budget ({config.dominant_tokens}+{config.contextual_tokens} = "
                       f"{config.tokens_per_image} tokens per image) is not among the published budgets.")
    return dict(
        title=f"{context.repo_id.split('/')[-1]}: LLaVA with VisionZip ({config.tokens_per_image} image tokens)",
        intro=f"{context.base} with **VisionZip** visual-token reduction: each image reaches the language model as "
              f"{config.tokens_per_image} tokens instead of {config.image_seq_length}.",
        weights_note=" except for a projector tuned for the reduced tokens" if context.tuned_projector else "",
        visionzip_layer=config.visionzip_layer,
        dominant_tokens=config.dominant_tokens,
        contextual_tokens=config.contextual_tokens,
        tokens_per_image=config.tokens_per_image,
        budget_note=budget_note,
    )


def _bounds(low, high) -> list[str]:
    """The optional count bounds of a method with an adaptive count, in words."""
    return [f"{word} {value}" for word, value in (("at least", low), ("at most", high)) if value is not None]


def trim_card_fields(config, context) -> dict:
    bounds = _bounds(config.trim_min_tokens, config.trim_max_tokens)
    budget = "the number of kept patches depends on the image and the question"
    budget += f" ({' and '.join(bounds)} patches)" if bounds else " (no bounds set)"
    budget += ", plus one mean token." if config.trim_append_mean_token else "."
    budget += (" Bounds can be set at load time, e.g. `from_pretrained(model_id, trust_remote_code=True, "
               "trim_max_tokens=128)`.")
    if context.source_is_trim_trained:
        warning = ("These weights come from a checkpoint fine-tuned with TRIM active (projector and language model "
                   "trained on the reduced tokens), as the authors released it.")
    else:
        warning = ("**Note:** these are LLaVA weights that were not trained with TRIM. The authors fine-tuned their "
                   "released checkpoints with TRIM active, and TRIM applied training-free to stock LLaVA weights "
                   "was reported to produce poor output. Evaluate before relying on it.")
    return dict(
        title=f"{context.repo_id.split('/')[-1]}: LLaVA with TRIM (question-aware token reduction)",
        intro=f"{context.base} with **TRIM** visual-token reduction: each image keeps only the patches that CLIP's "
              "question-conditioned scores single out, plus one token summarising the rest.",
        training_warning=warning,
        iqr_multiplier=config.trim_iqr_multiplier,
        mean_token=(", and the mean of all the other patches is appended as one extra token"
                    if config.trim_append_mean_token else " (this checkpoint appends no mean token)"),
        score_sign=(
            "As in the released TRIM code and checkpoints (`trim_negate_similarity=True`, this checkpoint's "
            "setting), the softmax is taken over the *negated* dot product, which the authors trained with."
            if config.trim_negate_similarity else
            "This checkpoint scores by the plain dot product (`trim_negate_similarity=False`); the released "
            "TRIM code and checkpoints negate it."
        ),
        coupling=(", pooled over all images of a call as in the released code" if config.trim_batch_coupled
                  else " of each image, so an image gets the same tokens alone or in a batch"),
        budget_description=budget,
    )


def prumerge_card_fields(config, context) -> dict:
    variant = "PruMerge+" if config.prumerge_plus else "PruMerge"
    bounds = _bounds(config.prumerge_min_tokens, config.prumerge_max_tokens)
    budget = "the number of outliers kept depends on the image"
    budget += f" ({' and '.join(bounds)})" if bounds else " (no bounds set)"
    budget += (", plus the sampled patches and one extra token." if config.prumerge_plus else
               ", plus one extra token.")
    budget += (" Bounds and the variant can be set at load time, e.g. `from_pretrained(model_id, "
               "trust_remote_code=True, prumerge_plus=True, prumerge_max_tokens=128)`.")
    return dict(
        title=f"{context.repo_id.split('/')[-1]}: LLaVA with {variant} (adaptive token reduction)",
        intro=f"{context.base} with **{variant}** visual-token reduction: each image keeps the patches its CLS token "
              "singles out, each merged with the patches most like it, plus one token summarising the rest.",
        variant=variant,
        variant_description=(
            "PruMerge+ (this checkpoint's setting, `prumerge_plus=True`) also keeps an evenly spaced sample of the "
            "patch grid, denser when fewer outliers were found." if config.prumerge_plus else
            "This checkpoint is plain PruMerge (`prumerge_plus=False`); PruMerge+ also keeps an evenly spaced "
            "sample of the patch grid."
        ),
        iqr_multiplier=config.prumerge_iqr_multiplier,
        coupling=(", pooled over all images of a call as in the released code" if config.prumerge_batch_coupled
                  else ", so an image gets the same tokens alone or in a batch"),
        budget_description=budget,
    )


# The budgets the VisionZip paper reports for LLaVA-NeXT (docs/llava_next.md): per crop -> tokens of a 2x2 image.
PUBLISHED_NEXT_VISIONZIP_BUDGETS = {(108, 20): 640, (54, 10): 320, (27, 5): 160}


def next_grid_totals(config) -> list[dict]:
    """One row per grid of the config's `image_grid_pinpoints`: `grid` (rows, cols), `canvas` (height, width) px,
    `crops`, `tokens` (the image's total at the config's per-crop budget) and `stock` (the stock processor's
    placeholders for an image of exactly the canvas size), from the LLaVA-NeXT family's count functions."""
    from ..modeling.family_llava_next import image_layouts, reduced_token_counts

    canvases = [tuple(pair) for pair in config.image_grid_pinpoints]
    layouts = image_layouts(canvases, config)  # an image of the canvas size picks that canvas
    totals = reduced_token_counts(layouts, config.tokens_per_crop)
    return [dict(grid=layout.grid, canvas=canvas, crops=layout.crops, tokens=total, stock=layout.placeholders)
            for canvas, layout, total in zip(canvases, layouts, totals)]


def llava_next_visionzip_card_fields(config, context) -> dict:
    rows = next_grid_totals(config)
    table = "\n".join(
        f"| {row['grid'][0]}x{row['grid'][1]} | {row['canvas'][0]}x{row['canvas'][1]} | {row['crops']} | "
        f"{row['tokens']} | {row['stock']} |" for row in rows
    )
    budget = (config.dominant_tokens, config.contextual_tokens)
    published = PUBLISHED_NEXT_VISIONZIP_BUDGETS.get(budget)
    if published:
        budget_note = (f"This checkpoint's budget, {budget[0]}+{budget[1]} per crop, is the paper's \"VisionZip "
                       f"{published}\" setting ({published} tokens for an image with a 2x2 grid).")
    else:
        budget_note = (f"This checkpoint's budget ({budget[0]}+{budget[1]} per crop) is not among the published "
                       "ones (108+20, 54+10 and 27+5 per crop: 640, 320 and 160 tokens on a 2x2 grid).")
    fewest, most = min(row["tokens"] for row in rows), max(row["tokens"] for row in rows)
    return dict(
        title=f"{context.repo_id.split('/')[-1]}: LLaVA-NeXT with VisionZip ({config.tokens_per_crop} tokens per crop)",
        intro=f"{context.base} with **VisionZip** visual-token reduction: every {config.vision_config.image_size}-px "
              "crop of an image (the base image and each crop of its grid) reaches the language model as "
              f"{config.tokens_per_crop} tokens, so an image gets between {fewest} and {most} tokens instead of up to "
              f"{max(row['stock'] for row in rows)}.",
        visionzip_layer=config.visionzip_layer,
        dominant_tokens=config.dominant_tokens,
        contextual_tokens=config.contextual_tokens,
        tokens_per_crop=config.tokens_per_crop,
        grid_totals=table,
        budget_note=budget_note,
    )
