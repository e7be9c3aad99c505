"""The method registry: each entry's classes, options, card fields and tool hooks agree with the code."""

import argparse
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, LlavaConfig, LlavaModel
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

import llava_token_reduction
from llava_token_reduction import methods
from llava_token_reduction.model_cards import __file__ as model_cards_init
from llava_token_reduction.tiny import DEMO_SHAPE, method_config_kwargs


METHOD_NAMES = ["visionzip", "trim", "prumerge"]


def test_the_registry_lists_the_methods_in_order_with_unique_names_and_types():
    assert list(methods.METHODS) == METHOD_NAMES
    assert len({m.model_type for m in methods.METHODS.values()}) == len(methods.METHODS)
    assert len({m.label for m in methods.METHODS.values()}) == len(methods.METHODS)
    assert methods.for_model_type("llava_trim") is methods.TRIM and methods.for_model_type("llava") is None
    with pytest.raises(ValueError, match=r"unknown reduction method 'zip'; choose from visionzip, trim"):
        methods.get("zip")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_classes_and_auto_registrations_agree(name):
    method = methods.get(name)
    config_class, model_class, generation_class = method.config_class, method.model_class, method.generation_class
    assert config_class.model_type == method.model_type and issubclass(config_class, LlavaConfig)
    assert generation_class.config_class is config_class and model_class.config_class is config_class
    assert issubclass(model_class, LlavaModel)
    for public in (method.config_class_name, method.model_class_name, method.generation_class_name):
        assert public in llava_token_reduction.__all__
    # What `import llava_token_reduction` registered with the Auto classes.
    assert type(AutoConfig.for_model(method.model_type)) is config_class
    assert AutoModel._model_mapping[config_class] is model_class
    assert AutoModelForImageTextToText._model_mapping[config_class] is generation_class
    assert PROCESSOR_MAPPING[config_class] is method.processor_class
    assert method.side_inputs == generation_class.image_side_input_names
    assert method.needs_clip_text_tower == ("clip_text_config" in config_class.sub_configs_defaults)


def _tiny_config(method, **overrides):
    return method.config_class(**method_config_kwargs(method, DEMO_SHAPE), **overrides)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_options_are_checked_config_fields_with_the_config_defaults(name):
    method = methods.get(name)
    config_class = method.config_class
    fields = set(config_class().to_dict()) - set(LlavaConfig().to_dict())
    assert {option.field for option in method.options} <= fields
    for option in method.options:
        assert getattr(config_class, option.field) == option.default, option.field
        assert option.default is None if option.optional else type(option.default) is option.type, option.field
        # A load-time override goes through the config's per-field check.
        assert option.field in config_class.single_field_checks, option.field
        bad = "not a number" if option.type is not str else 0
        with pytest.raises(ValueError, match=option.field):
            setattr(_tiny_config(method), option.field, bad)
    for variant in method.bench_variants:
        config = _tiny_config(method, **dict(variant.overrides))
        assert all(getattr(config, key) == value for key, value in variant.overrides)


def test_option_flags_do_not_collide_and_parse_into_overrides():
    flags = [option.flag for method in methods.METHODS.values() for option in method.options]
    assert len(flags) == len(set(flags))
    parser = argparse.ArgumentParser()
    for method in methods.METHODS.values():
        for option in method.options:
            option.add_to(parser)
    args = parser.parse_args(["--dominant-tokens", "108", "--no-trim-batch-coupled", "--trim-iqr-multiplier", "2"])
    assert (args.dominant_tokens, args.contextual_tokens, args.trim_batch_coupled) == (108, None, False)
    assert args.trim_iqr_multiplier == 2.0 and isinstance(args.trim_iqr_multiplier, float)
    assert methods.VISIONZIP.overrides_from(args) == {"dominant_tokens": 108}
    assert methods.TRIM.overrides_from(args) == {}  # TRIM offers no command-line options today
    text = " ".join(parser.format_help().split())
    assert "--dominant-tokens N VisionZip dominant tokens, CLS included (default: the checkpoint's, else 54)" in text
    assert "at most this many kept patches (default: the checkpoint's, else unset)" in text


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_the_cli_options_are_those_the_tools_accept_today(name):
    from llava_token_reduction.cli import build_parser

    parser = build_parser()
    for option in methods.get(name).cli_options():
        for command in (["demo"], ["show", "--image", "x", "--method", name], ["convert", name, "SRC", "OUT"]):
            # A bool option is a `--flag` / `--no-flag` pair; the others take a value.
            given, expected = ([option.flag], True) if option.type is bool else ([option.flag, "7"], 7)
            args = parser.parse_args([*command, *given])
            assert getattr(args, option.field) == expected, (command, option.flag)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_card_fields_are_the_templates_own_placeholders(name):
    from pathlib import Path

    method = methods.get(name)
    template = (Path(model_cards_init).parent / method.card_template).read_text()
    placeholders = set(re.findall(r"\$\{?([a-z_]+)\}?", template))
    assert placeholders == set(methods.COMMON_CARD_FIELDS) | set(method.card_fields)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_tool_hooks_resolve_to_callables(name):
    method = methods.get(name)
    assert callable(methods._resolve(method.show_selection))
    assert callable(methods._resolve(method.convert_function))
    assert method.convert_function.endswith("convert_" + name)


def test_descriptions_of_a_config_and_a_result():
    config = _tiny_config(methods.VISIONZIP, dominant_tokens=108, contextual_tokens=20)
    assert methods.VISIONZIP.describe(config) == "VisionZip 108+20"
    assert methods.VISIONZIP.describe_result(config, None) == "108 dominant + 20 merged"
    trim_config = _tiny_config(methods.TRIM)
    output = SimpleNamespace(kept_indices=[torch.arange(5)], pooler_output=[torch.zeros(6, 4)])
    assert methods.TRIM.describe(trim_config) == "TRIM"
    assert methods.TRIM.describe_result(trim_config, output) == "5 kept + 1 mean"
    output.pooler_output = [torch.zeros(5, 4)]
    assert methods.TRIM.describe_result(trim_config, output) == "5 kept"


def test_reading_the_registry_imports_no_tool_and_no_plotting():
    code = (
        "import sys; import llava_token_reduction.methods as m; m.VISIONZIP.config_class; "
        "heavy = [n for n in ('matplotlib', 'llava_token_reduction.conversion', 'llava_token_reduction.show', "
        "'llava_token_reduction.demo', 'llava_token_reduction.bench', 'llava_token_reduction.tuning') "
        "if n in sys.modules]; print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
