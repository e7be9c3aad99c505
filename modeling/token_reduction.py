"""The reductions' tensor functions under the module name they had before each method got its own file
(`method_visionzip.py`, `method_trim.py`, shared helpers in `token_selection.py`). Kept importable for code that
imports them from here; no model file imports it, so checkpoints do not ship it."""

from .method_trim import bound_token_counts, select_with_mean_token, trim_reduce, trim_similarity_scores  # noqa: F401
from .method_visionzip import (  # noqa: F401
    cls_attention_scores,
    contextual_target_positions,
    contextual_targets_and_owners,
    dominant_keep_mask,
    merge_into_contextual_tokens,
    visionzip_assignment,
    visionzip_reduce,
)
from .token_selection import gather_tokens, iqr_outlier_counts, split_kept_and_rest, top_k_in_raster_order  # noqa: F401
