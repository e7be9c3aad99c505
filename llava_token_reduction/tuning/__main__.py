"""`python -m llava_token_reduction.tuning ...` (also `accelerate launch -m llava_token_reduction.tuning ...`):
the same options as `llava-token-reduction tune ...`."""

import sys

from .train import main


if __name__ == "__main__":
    sys.exit(main())
