"""`llava-token-reduction convert {visionzip,trim} SRC OUT [...]`, also `python -m llava_token_reduction.conversion`.

`register(subparsers)` adds the `convert` command to the package's command line (`llava_token_reduction.cli`);
`main(argv)` runs it on its own. Exit status 0 only when the output was written and verified; otherwise one
line on stderr with the reason and status 1 (2 for usage errors, from argparse).
"""

import argparse
import re
import sys

from ..methods import METHODS


PROG = "llava-token-reduction convert"
_SHARD_SIZE_HELP = "largest shard, e.g. 5GB, 500MB or a number of bytes (default: 5GB)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
    """Bytes in a size such as "5GB", "500MB", "2GiB" or "123456" (decimal units, as transformers)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or a byte count, got {text!r}")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the shard size must be positive, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser, method) -> None:
    stock = " or ".join(classes.model_family.label for classes in method.families.values())
    parser.add_argument("src", metavar="SRC", help=f"stock transformers {stock} checkpoint, or an original "
                                                    "LLaVA-codebase (LLaVA-1.5) one: a local directory or a hub id")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist, unless --overwrite)")
    parser.add_argument("--projector", metavar="FILE",
                        help="replace the projector: mm_projector.bin or .safetensors "
                             "(model.mm_projector.{0,2}.* or multi_modal_projector.linear_{1,2}.*)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="store every floating tensor in "
                                                                                    "this dtype (default: SRC's)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", help=_SHARD_SIZE_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is a checkpoint this tool wrote "
                        "(never a symlink, the working or home directory, or any other directory)")
    parser.add_argument("--force", action="store_true", help="convert although the CLIP checkpoint's vision weights "
                                                             "differ from SRC's vision tower")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload OUT to this hub repository after verification")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository as private")
    parser.add_argument("--repo-id", metavar="REPO", help="the model id the model card's snippets use (default: "
                                                          "--push-to-hub, else your-username/<OUT name>)")
    parser.add_argument("--base-model", metavar="ID", action="append", dest="base_models",
                        help="base_model metadata of the card (repeatable; default: SRC when it is a hub id)")
    parser.add_argument("--license", help="license metadata of the card (default: SRC's card's, else 'other')")
    parser.add_argument("--pad-vocab-multiple", type=_positive_int, default=64, metavar="N",
                        help="when <image> is added to the vocabulary, round the embedding rows up to a multiple of N "
                             "(default: 64, as transformers' LLaVA converter)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def register(subparsers) -> None:
    """Add `convert` (with one sub-command per registered method) to a subparsers object."""
    labels = " or ".join(method.label for method in METHODS.values())
    convert = subparsers.add_parser(
        "convert", help=f"convert a LLaVA checkpoint into a {labels} checkpoint",
        description="Convert a stock transformers (LLaVA-1.5 or LLaVA-NeXT) or original LLaVA-codebase checkpoint "
                    f"into a self-contained {labels} checkpoint (safetensors, remote code, processor, model card).",
    )
    methods = convert.add_subparsers(title="methods", dest="method", metavar="METHOD")
    methods.required = True
    for method in METHODS.values():
        sub = methods.add_parser(method.name, help=method.convert_help)
        _add_common(sub, method)
        for option in method.cli_options():
            option.add_to(sub, help=f"{option.help} (default {option.default})",
                          type=_positive_int if option.type is int else None)
        if method.needs_clip_text_tower:
            sub.add_argument("--clip", metavar="CLIP_SRC", help="CLIPModel checkpoint of the vision tower, e.g. "
                                                                "openai/clip-vit-large-patch14-336 (optional only when "
                                                                "SRC carries the CLIP text tower)")
        else:
            sub.add_argument("--clip", metavar="CLIP_SRC", help="CLIP checkpoint for an original-format SRC without "
                                                                "its vision tower (default: SRC's mm_vision_tower)")
    convert.set_defaults(handler=run)


def request_from_args(args: argparse.Namespace):
    from .converter import ConversionRequest

    return ConversionRequest(
        method=args.method, src=args.src, out=args.out, clip=args.clip, projector=args.projector,
        overrides=METHODS[args.method].overrides_from(args), dtype=args.dtype, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite, force=args.force,
        push_to_hub=args.push_to_hub, private=args.private, repo_id=args.repo_id, base_models=args.base_models,
        license=args.license, pad_vocab_multiple=args.pad_vocab_multiple, progress=args.progress,
    )


def run(args: argparse.Namespace) -> int:
    """Convert; print the summary on stdout, or one line on stderr and return 1."""
    from .output_place import ConversionInterrupted

    try:
        from .converter import convert

        result = convert(request_from_args(args))
    except ConversionInterrupted as interrupted:  # OUT was being written: the message says what is true
        print(f"{PROG}: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before anything was written
        print(f"{PROG}: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure is reported as one line
        if getattr(args, "traceback", False):
            raise
        from ..errors import print_failure

        return print_failure(PROG, error)
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_token_reduction.conversion")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback when a conversion fails")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m llava_token_reduction.conversion convert {visionzip,trim} SRC OUT ...`; the leading `convert`
    may be left out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in METHODS:
        argv = ["convert", *argv]
    args = build_parser().parse_args(argv)
    return args.handler(args)


__all__ = ["register", "run", "main", "build_parser"]
