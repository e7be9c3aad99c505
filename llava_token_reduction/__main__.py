"""`python -m llava_token_reduction ...` runs the same command line as `llava-token-reduction ...`."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
