"""LLaVA instruction data for projector tuning: reading, checking, subsetting, encoding and batching.

Record format (LLaVA-1.5's `llava_v1_5_mix665k.json`), as a JSON list or as JSON Lines (one record a line):

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

- `image` is a path relative to `--image-folder` (or a list of paths, one per `<image>`); records without
  `image` are text-only (LLaVA-665K has ~40k of them) and must not contain `<image>`.
- Turns alternate `human` / `gpt`, starting with `human`. With an image, the first human turn holds `<image>`.

Encoding. The prompt is rendered turn by turn, either with the processor's chat template or with LLaVA-1.5's
own conversation format (`llava-v1`: system prompt, `USER: ... ASSISTANT: ...</s>`). Every assistant answer
plus one end-of-sequence token (the template's own when it writes one) is a target; everything else (system
prompt, user turns, role markers, image placeholders, padding) is labelled -100. Each `<image>` becomes the
processor's full placeholder run; the model reduces the image and compacts the placeholders and labels itself.

TRIM's question (the text the CLIP tower scores patches against) follows evaluation semantics: for each image,
the text of the human turn that brings it, without `<image>` (for LLaVA data: the first human turn).

The code lives in three modules along its seams: `records` (reading, checking, subsetting), `encoding` (token
ids and labels) and `dataset` (images, collator, sampler); this module re-exports their names.
"""

from .common import PROMPT_FORMATS, DataError
from .dataset import *  # noqa: F401,F403
from .dataset import __all__ as _dataset_names
from .encoding import *  # noqa: F401,F403
from .encoding import __all__ as _encoding_names
from .records import *  # noqa: F401,F403
from .records import __all__ as _records_names


__all__ = ["DataError", "PROMPT_FORMATS", *_records_names, *_encoding_names, *_dataset_names]
