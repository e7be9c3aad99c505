"""`python -m llava_token_reduction.conversion [convert] {visionzip,trim} SRC OUT ...`"""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
