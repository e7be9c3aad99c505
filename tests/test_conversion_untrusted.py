"""A source checkpoint's code never runs during `convert` and never reaches the output.

Each case plants an `auto_map` entry, in the form the hub uses (`"<repo-or-dir>--module.Class"`), in one of the
inputs' configs; the named module writes a marker file when imported. Stock transformers loading the same
source (without `trust_remote_code`) runs nothing, so neither may the converter, nor a user loading its output
with `trust_remote_code=True` as the README says."""

import json
import shutil

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from conversion_inputs import save_clip, save_stock, vision_state_of
from llava_token_reduction.conversion.cli import main as conversion_main
from llava_token_reduction.conversion.foreign_code import foreign_code_references, strip_foreign_code


PAYLOAD = """\
import pathlib
pathlib.Path({marker!r}).write_text("payload ran")
from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
class EvilProcessor(LlavaProcessor):
    pass
class EvilImageProcessor(CLIPImageProcessorPil):
    pass
"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("untrusted")
    stock = base / "stock"
    model = save_stock(stock)
    clip = base / "clip"
    save_clip(clip, vision_state_of(model))
    return stock, clip


def _plant(directory, marker, file_name, where, key, class_name):
    (directory / "evil.py").write_text(PAYLOAD.format(marker=str(marker)))
    path = directory / file_name
    config = json.loads(path.read_text())
    target = config if where is None else config[where]
    reference = f"{directory}--evil.{class_name}"
    target["auto_map"] = {key: [None, reference] if key == "AutoTokenizer" else reference}
    path.write_text(json.dumps(config))


def _all_auto_map_references(directory):
    found = []

    def walk(node):
        if isinstance(node, dict):
            for name, value in node.items():
                if name == "auto_map":
                    found.extend(str(v) for v in value.values())
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in directory.rglob("*.json"):
        walk(json.loads(path.read_text()))
    return found


CASES = [
    ("visionzip", "src", "tokenizer_config.json", None, "AutoTokenizer", "EvilTokenizer"),
    ("visionzip", "src", "processor_config.json", None, "AutoProcessor", "EvilProcessor"),
    ("visionzip", "src", "processor_config.json", "image_processor", "AutoImageProcessor", "EvilImageProcessor"),
    ("trim", "clip", "tokenizer_config.json", None, "AutoTokenizer", "EvilTokenizer"),
]


@pytest.mark.parametrize("method,which,file_name,where,key,class_name", CASES,
                         ids=["tokenizer", "processor", "nested-image-processor", "clip-tokenizer"])
def test_convert_runs_and_ships_no_code_of_its_inputs(pristine, tmp_path, capsys, method, which, file_name, where,
                                                      key, class_name):
    stock, clip = (shutil.copytree(p, tmp_path / p.name) for p in pristine)
    marker = tmp_path / "MARKER"
    _plant(stock if which == "src" else clip, marker, file_name, where, key, class_name)
    out = tmp_path / "out"
    argv = [method, str(stock), str(out), "--no-progress"] + (["--clip", str(clip)] if method == "trim" else [])
    status = conversion_main(argv)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert not marker.exists(), "the converter ran the input's code"
    assert not (out / "evil.py").exists()
    assert all("evil" not in reference and "--" not in reference for reference in _all_auto_map_references(out))
    # Loading the output as the README says runs nothing either.
    AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert not marker.exists(), "the output ran the input's code"


def test_foreign_references_are_found_and_stripped_at_any_depth(tmp_path):
    (tmp_path / "configuration_llava_trim.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": [None, "owner/repo--tok.T"]}}))
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "auto_map": {"AutoProcessor": "configuration_llava_trim.P", "AutoConfig": "elsewhere.C"},
        "image_processor": {"auto_map": {"AutoImageProcessor": "a.b.C"}},
    }))
    found = foreign_code_references(tmp_path)
    assert sorted(found) == ["processor_config.json: a.b.C", "processor_config.json: elsewhere.C",
                             "sub/tokenizer_config.json: owner/repo--tok.T"]
    assert sorted(strip_foreign_code(tmp_path)) == ["processor_config.json", "sub/tokenizer_config.json"]
    assert foreign_code_references(tmp_path) == []
    kept = json.loads((tmp_path / "processor_config.json").read_text())
    assert kept["auto_map"] == {"AutoProcessor": "configuration_llava_trim.P"}
    assert "auto_map" not in kept["image_processor"]
