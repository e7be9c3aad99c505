"""The tools take a method from the registry alone: a method added to `METHODS` (here a renamed copy of
VisionZip's entry) is offered by `convert`, carried into the conversion request, and given a model card,
without an edit to any tool."""

import argparse
import dataclasses

import pytest

from llava_token_reduction.methods import METHODS, Option


@pytest.fixture
def extra_method(monkeypatch):
    entry = dataclasses.replace(
        METHODS["visionzip"], name="zipcopy", label="ZipCopy", convert_help="a copy of VisionZip's entry",
        options=(*METHODS["visionzip"].options, Option("visionzip_layer", int, -2, "the layer", cli=True)),
    )
    monkeypatch.setitem(METHODS, "zipcopy", entry)
    return entry


def test_convert_offers_every_registered_method_with_its_cli_options(extra_method):
    from llava_token_reduction.conversion.cli import build_parser, request_from_args

    args = build_parser().parse_args(["convert", "zipcopy", "src", "out", "--visionzip-layer", "3",
                                      "--dominant-tokens", "20"])
    request = request_from_args(args)
    assert request.method == "zipcopy"
    assert request.overrides == {"dominant_tokens": 20, "visionzip_layer": 3}
    with pytest.raises(SystemExit):  # a negative count is refused by the parser, as before
        build_parser().parse_args(["convert", "zipcopy", "src", "out", "--dominant-tokens", "-1"])


def test_model_card_comes_from_the_registry_entry(extra_method):
    from llava_token_reduction import LlavaVisionZipConfig
    from llava_token_reduction.conversion.model_card import render_model_card
    from llava_token_reduction.tiny import llava_config_kwargs

    config = LlavaVisionZipConfig(**llava_config_kwargs())
    # Re-label the VisionZip type as the copy's: the card follows whatever entry owns the model_type.
    copy = dataclasses.replace(extra_method, model_type="llava_visionzip")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(METHODS, "visionzip", copy)
        card = render_model_card(config, repo_id="someone/zip")
    assert "llava-token-reduction convert zipcopy" in card


def _title_only(config, context):
    return {"title": "t", "intro": "i"}


def test_card_fields_function_must_fill_the_declared_fields(monkeypatch):
    from llava_token_reduction import LlavaVisionZipConfig
    from llava_token_reduction.conversion.model_card import render_model_card
    from llava_token_reduction.tiny import llava_config_kwargs

    # VisionZip's entry with a fields function that fills only the title and intro.
    broken = dataclasses.replace(METHODS["visionzip"], card_fields_reference=f"{__name__}:_title_only")
    monkeypatch.setitem(METHODS, "visionzip", broken)
    with pytest.raises(ValueError, match="card fields lack"):
        render_model_card(LlavaVisionZipConfig(**llava_config_kwargs()), repo_id="someone/zip")


def test_option_add_to_takes_a_parsing_function():
    parser = argparse.ArgumentParser()
    Option("budget", int, 3, "a budget", cli=True).add_to(parser, type=lambda text: int(text) * 10)
    assert parser.parse_args(["--budget", "2"]).budget == 20


def test_demo_runs_a_method_it_only_knows_from_the_registry(extra_method):
    from llava_token_reduction import demo

    report = demo.run_demo(method="zipcopy", overrides={"dominant_tokens": 20}, repeats=1, max_new_tokens=1,
                           status=lambda text: None)
    labels = [measurement.label for measurement in report.measurements]
    assert labels == ["stock LLaVA", "VisionZip 20+10"]
    assert report.measurements[1].image_tokens == 30
    with pytest.raises(ValueError, match="trim_max_tokens is not a setting of ZipCopy"):
        demo.run_demo(method="zipcopy", overrides={"trim_max_tokens": 3}, status=lambda text: None)
