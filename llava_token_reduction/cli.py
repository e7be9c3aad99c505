"""The `llava-token-reduction` command line (also `python -m llava_token_reduction`).

Each subcommand lives in its own module, listed in `COMMAND_MODULES`. A command module provides

    def register(subparsers) -> None:
        parser = subparsers.add_parser("name", help="...", description="...")
        parser.add_argument(...)
        parser.set_defaults(handler=run)

    def run(args: argparse.Namespace) -> int: ...   # the exit status

`register` should stay cheap (no model loading, ideally no torch work) so that `--help` is quick; do the
heavy imports inside `run`. To add a command, write its module and append its dotted name below.
"""

import argparse
import importlib
import sys

from .errors import UserError, print_failure
from .methods import labels_in_words
from .progress import bars_wanted, transformers_bars


PROG = "llava-token-reduction"

# Modules that each register one subcommand, in the order they appear in `--help`.
COMMAND_MODULES = (
    "llava_token_reduction.demo",
    "llava_token_reduction.conversion.cli",
    "llava_token_reduction.bench",
    "llava_token_reduction.show",
    "llava_token_reduction.tuning.train",
    "llava_token_reduction.toy.cli",
    "llava_token_reduction.serve",
)


# A failure the user can act on: printed as one line on stderr, without a traceback (`errors.UserError`).
CommandError = UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=labels_in_words()
        + " visual-token reduction for LLaVA (Hugging Face transformers).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full Python traceback when a command fails"
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: `sys.argv[1:]`), run the chosen command and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with transformers_bars(bars_wanted(args)):  # `--no-progress` silences transformers' bars too
            status = handler(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the command line reports every failure as one line
        if args.traceback:
            raise
        return print_failure(f"{PROG} {args.command}", error)
    return 0 if status is None else int(status)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llava-token-reduction")
    except Exception:  # noqa: BLE001 - not installed as a distribution (e.g. run from a source tree)
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
