"""Model card templates (`visionzip.md`, `trim.md`), filled by `llava_token_reduction.conversion.render_model_card`."""
