"""`llava-token-reduction serve CKPT [transformers serve options...]`: transformers' own OpenAI-compatible server
(`transformers serve`, `/v1/chat/completions`) for our checkpoints.

`transformers serve` (5.24) cannot start with a reduced checkpoint by itself: its model manager picks the class
from transformers' built-in tables (`MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES`, else `getattr(transformers,
architectures[0])`) instead of the checkpoint's `auto_map`, and then looks the modality up by class name
("Unknown modality"). This command runs the server **in its own process** after adding our model types to
those two look-ups of that process (`adapt_serve_lookups`): the table entries and an `AutoModelForMultimodalLM`
registration. Nothing is written to the transformers installation; other processes, and a plain
`transformers serve`, are untouched. Everything else (options, endpoints, generation, streaming) is
transformers' own; every option after CKPT is passed to `transformers serve` as it is.

`usage.prompt_tokens` in the responses is what the server counts: the processor's prompt, before the reduction
(the server offers no hook to report the shorter sequence the language model saw).
"""

import argparse
import sys


def served_model_classes() -> dict[str, type]:
    """Our reduced model types available in this process, with their generation class."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import llava_token_reduction  # noqa: F401 - registers our classes with the Auto classes

    from .methods import reduced_model_types

    classes = {}
    for model_type in reduced_model_types():
        if model_type in CONFIG_MAPPING:
            classes[model_type] = AutoModelForImageTextToText._model_mapping[CONFIG_MAPPING[model_type]]
    return classes


def adapt_serve_lookups() -> list[str]:
    """Make this process's `transformers serve` resolve our model types: add them to the multimodal-LM name
    table its model manager consults for the class and the modality, and register their classes with
    `AutoModelForMultimodalLM`, which it then loads them with. Returns the model types added."""
    from transformers import AutoModelForMultimodalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

    added = []
    for model_type, model_class in served_model_classes().items():
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES.setdefault(model_type, model_class.__name__)
        AutoModelForMultimodalLM.register(model_class.config_class, model_class, exist_ok=True)
        added.append(model_type)
    return added


def _check_serving_installed() -> None:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        from .cli import CommandError

        raise CommandError(
            "serving needs fastapi, uvicorn, pydantic and openai: pip install 'llava-token-reduction[serve]'"
        )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a checkpoint with transformers' OpenAI-compatible server",
        description=(
            "Run `transformers serve CKPT ...` for a VisionZip or TRIM checkpoint (or a stock LLaVA one): an "
            "OpenAI-compatible /v1/chat/completions endpoint, streaming too. Every option after CKPT is a "
            "`transformers serve` option (see `transformers serve --help`), e.g. --host 127.0.0.1 --port 8000 "
            "--device cpu --dtype bfloat16 --trust-remote-code. Needs the `serve` extra."
        ),
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory or hub id, preloaded")
    parser.add_argument("serve_options", nargs=argparse.REMAINDER, help="options for `transformers serve`")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    _check_serving_installed()
    adapt_serve_lookups()
    from transformers.cli.transformers import app

    # standalone_mode=False: typer returns (or raises) instead of exiting, so errors reach our one-line report.
    app(["serve", args.checkpoint, *args.serve_options], standalone_mode=False, prog_name="transformers")
    return 0


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
