"""The command line and its `demo` command: help, exit codes, the printed table, the saved checkpoints."""

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conversion_inputs import save_clip, vision_state_of
from llava_token_reduction import LlavaVisionZipForConditionalGeneration, cli, demo
from llava_token_reduction.shared_weights import twin


# Few repeats and tokens keep the whole file fast; the numbers checked here do not depend on them.
QUICK = ["--repeats", "1", "--max-new-tokens", "3"]


def table_row(output: str, label: str) -> list[str]:
    """The cells after `label` in the demo's table (cells are separated by two or more spaces)."""
    for line in output.splitlines():
        if line.startswith(label):
            return re.split(r"\s{2,}", line[len(label):].strip())
    raise AssertionError(f"no table row {label!r} in:\n{output}")


def table_header(output: str) -> list[str]:
    """The column titles of the demo's table: the line above its row of dashes."""
    lines = output.splitlines()
    for above, line in zip(lines, lines[1:]):
        if line.startswith("-----"):
            return re.split(r"\s{2,}", above.strip())
    raise AssertionError(f"no table in:\n{output}")


def number(cell: str) -> float:
    """The value of a cell such as "64 (-88.9%)" or "21.3 (1.2x faster)"."""
    return float(cell.split()[0])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `demo --random` run, in-process, keeping its checkpoint: (exit status, stdout, stderr, directory)."""
    directory = tmp_path_factory.mktemp("demo_checkpoint")
    status, out, err = run_main(["demo", "--random", *QUICK, "--output", str(directory)])
    return status, out, err, directory


def run_main(argv):
    """`cli.main(argv)` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def test_demo_prints_stock_visionzip_and_trim_columns(demo_run):
    status, out, _, _ = demo_run
    assert status == 0
    assert "random weights" in out and "gibberish" in out
    assert "TRIM's kept count comes from a random CLIP" in out
    assert table_header(out) == ["stock LLaVA", "VisionZip 54+10", "TRIM", "PruMerge"]
    tokens = table_row(out, "image tokens per image")
    assert tokens[:2] == ["576", "64 (-88.9%)"]
    assert table_row(out, "  made of")[:2] == ["all patches", "54 dominant + 10 merged"]
    # TRIM's column: the adaptive count of kept patches plus the mean token, and the question they were scored on.
    kept = re.fullmatch(r"(\d+) kept \+ 1 mean", table_row(out, "  made of")[2])
    assert kept, out
    trim_tokens = int(number(tokens[2]))
    assert trim_tokens == int(kept.group(1)) + 1 and 2 <= trim_tokens <= 577
    assert f"({(trim_tokens - 576) / 576 * 100:+.1f}%)" in tokens[2]
    assert f"TRIM's question (scored with the CLIP text tower): {demo.DEFAULT_QUESTION!r}" in out
    lengths = [int(number(cell)) for cell in table_row(out, "sequence seen by the LM")]
    assert lengths[0] - lengths[1] == 576 - 64 and lengths[0] - lengths[2] == 576 - trim_tokens
    for label in ("vision tower + projector (ms)", "LM prefill (ms)", "whole forward pass (ms)"):
        cells = table_row(out, label)
        assert len(cells) == 4 and all(number(cell) > 0 for cell in cells), label
        assert all(re.search(r"\(\d+\.\dx (faster|slower)\)$", cell) for cell in cells[1:]), cells
    assert re.search(r"^VisionZip 54\+10: '.*'$", out, flags=re.MULTILINE)
    assert re.search(r"^TRIM: '.*'$", out, flags=re.MULTILINE)
    # PruMerge's column, from the registry: its adaptive count of merged patches plus the extra token.
    assert re.fullmatch(r"\d+ merged( \+ 1 extra)?", table_row(out, "  made of")[3])
    assert re.search(r"^PruMerge: '.*'$", out, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def toy_demo_run():
    """The README's first command, `demo` with no options (few repeats): the bundled toy."""
    return run_main(["demo", *QUICK])


def test_demo_runs_the_bundled_toy_by_default_and_answers_its_question(toy_demo_run):
    """Without --model or --random the demo is the trained toy: stock LLaVA, VisionZip at the toy's 13+3, TRIM and
    PruMerge on the bundled held-out scene and question; the right answer and the shipped accuracy table follow.
    Learned behaviour: stock LLaVA, VisionZip and TRIM all give the right answer (the question was chosen by a
    rule fixed before training, `toy.ship.demo_question`)."""
    from llava_token_reduction.toy import ASSETS
    from llava_token_reduction.toy.ship import demo_question

    status, out, err = toy_demo_run
    assert status == 0, err
    assert "NOTE: this model has random weights" not in out and str(ASSETS / "trim") in out
    assert table_header(out) == ["stock LLaVA", "VisionZip 13+3", "TRIM", "PruMerge"]
    assert table_row(out, "image tokens per image")[:2] == ["16", "16 (+0.0%)"]
    asked = demo_question()
    assert f"TRIM's question (scored with the CLIP text tower): {asked.text!r}" in out
    assert f"The right answer: {asked.answer} " in out
    for label in ("stock LLaVA", "VisionZip 13+3", "TRIM"):
        assert re.search(rf"^{re.escape(label)}: '{asked.answer}'$", out, flags=re.MULTILINE), (label, out)
    assert (ASSETS / "accuracy.md").read_text().strip() in out


def test_demo_reports_progress_on_stderr(demo_run):
    _, out, err, _ = demo_run
    assert "building a small LLaVA with random weights" in err
    assert "demo:" not in out


def test_demo_keeps_loadable_visionzip_and_trim_checkpoints(demo_run):
    from safetensors.torch import load_file

    _, out, _, directory = demo_run
    assert str(directory / "visionzip") in out and str(directory / "trim") in out
    for name, model_type, code in (("visionzip", "llava_visionzip", "modeling_llava_visionzip.py"),
                                   ("trim", "llava_trim", "modeling_llava_trim.py")):
        config = json.loads((directory / name / "config.json").read_text())
        assert config["model_type"] == model_type
        assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= set(config["auto_map"])
        assert (directory / name / "processor_config.json").is_file()
        assert (directory / name / code).is_file()
    config = json.loads((directory / "visionzip" / "config.json").read_text())
    assert (config["dominant_tokens"], config["contextual_tokens"]) == (54, 10)
    processor_config = json.loads((directory / "trim" / "processor_config.json").read_text())
    assert "AutoProcessor" in processor_config.get("auto_map", {})
    # Both checkpoints hold the same LLaVA weights; TRIM adds its CLIP text tower and visual_projection.
    visionzip = load_file(directory / "visionzip" / "model.safetensors")
    trim = load_file(directory / "trim" / "model.safetensors")
    assert set(visionzip) < set(trim)
    assert all(torch.equal(visionzip[key], trim[key]) for key in visionzip)
    assert {key.split(".")[1] for key in set(trim) - set(visionzip)} == {"clip_text_model", "visual_projection"}


def test_demo_visionzip_only_with_budget_overrides():
    status, out, err = run_main([
        "demo", "--random", *QUICK, "--method", "visionzip", "--dominant-tokens", "108", "--contextual-tokens", "20",
    ])
    assert status == 0, err
    assert table_header(out) == ["stock LLaVA", "VisionZip 108+20"]
    assert table_row(out, "image tokens per image") == ["576", "128 (-77.8%)"], err
    assert "TRIM" not in out


@pytest.fixture(scope="module")
def tiny_clip_dir(stock_llava_model, tmp_path_factory):
    """A CLIPModel checkpoint whose vision tower is the tiny stock LLaVA's (as openai/clip-vit-large-patch14-336
    is LLaVA-1.5's)."""
    directory = tmp_path_factory.mktemp("clip")
    save_clip(directory, vision_state_of(stock_llava_model))
    return directory


def test_demo_on_a_stock_llava_checkpoint_with_clip(stock_llava_dir, tiny_clip_dir, tmp_path):
    """`--model` takes a stock LLaVA checkpoint (here a tiny local one: 64 patches): VisionZip loads it with
    the budget overrides, TRIM is converted with `--clip`'s text tower, `--output` keeps both checkpoints."""
    output = tmp_path / "kept"
    status, out, err = run_main([
        "demo", *QUICK, "--model", str(stock_llava_dir), "--clip", str(tiny_clip_dir),
        "--dominant-tokens", "10", "--contextual-tokens", "4", "--output", str(output),
    ])
    assert status == 0, err
    assert "random weights" not in out
    assert table_header(out) == ["stock LLaVA", "VisionZip 10+4", "TRIM", "PruMerge"]
    tokens = table_row(out, "image tokens per image")
    assert tokens[:2] == ["64", "14 (-78.1%)"]
    assert re.fullmatch(r"\d+ kept( \+ 1 mean)?", table_row(out, "  made of")[2])
    assert 1 <= number(tokens[2]) <= 64
    assert "converting" in err and "model of type `llava`" not in err
    assert "convert trim: TRIM on stock LLaVA weights is training-free" in out
    config = json.loads((output / "visionzip" / "config.json").read_text())
    assert (config["model_type"], config["dominant_tokens"], config["contextual_tokens"]) == ("llava_visionzip", 10, 4)
    assert json.loads((output / "trim" / "config.json").read_text())["model_type"] == "llava_trim"


@pytest.fixture(scope="module")
def tiny_trim_dir(stock_llava_dir, tiny_clip_dir, tmp_path_factory):
    from llava_token_reduction.conversion import convert_trim

    directory = tmp_path_factory.mktemp("trim") / "checkpoint"
    convert_trim(stock_llava_dir, directory, clip=str(tiny_clip_dir), progress=False)
    return directory


def test_demo_on_a_trim_checkpoint_needs_no_clip(tiny_trim_dir):
    """A TRIM checkpoint carries its text tower; VisionZip runs on its LLaVA weights."""
    status, out, err = run_main(["demo", *QUICK, "--model", str(tiny_trim_dir), "--dominant-tokens", "10",
                                 "--contextual-tokens", "4"])
    assert status == 0, err
    assert table_header(out) == ["stock LLaVA", "VisionZip 10+4", "TRIM", "PruMerge"]
    assert table_row(out, "image tokens per image")[1] == "14 (-78.1%)"
    status, out, err = run_main(["demo", *QUICK, "--model", str(tiny_trim_dir), "--method", "trim"])
    assert status == 0, err
    assert table_header(out) == ["stock LLaVA", "TRIM"]


@pytest.mark.parametrize("argv, message", [
    (["--clip", "somewhere"], "--clip goes with --model"),
    (["--random", "--model", "x"], "--random builds its own model"),
    (["--seed", "3"], "--seed is the seed of the random weights; it goes with --random"),
    (["--model", "x", "--clip", "somewhere", "--method", "visionzip"], "--clip is only used for TRIM"),
    (["--method", "trim", "--dominant-tokens", "10"], "VisionZip budget"),
    (["--dominant-tokens", "0"], "dominant_tokens"),
])
def test_demo_refuses_inconsistent_options(argv, message, capsys):
    assert cli.main(["demo", *argv]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert "Traceback" not in err and not re.search(r"^demo: ", err, flags=re.MULTILINE)  # before any work


def test_demo_trim_from_stock_llava_needs_clip(stock_llava_dir, capsys):
    assert cli.main(["demo", "--model", str(stock_llava_dir), "--method", "trim"]) == 1
    err = capsys.readouterr().err
    assert "--clip CLIP_SRC" in err and "openai/clip-vit-large-patch14-336" in err and "--method visionzip" in err
    assert not re.search(r"^demo: ", err, flags=re.MULTILINE)


def test_demo_refuses_clip_with_a_trim_checkpoint_and_trim_from_visionzip(
    tiny_trim_dir, visionzip_checkpoint_dir, capsys
):
    assert cli.main(["demo", "--model", str(tiny_trim_dir), "--clip", "somewhere"]) == 1
    assert "carries its CLIP text tower already" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(visionzip_checkpoint_dir), "--method", "trim", "--clip", "x"]) == 1
    assert "is a VisionZip checkpoint" in capsys.readouterr().err


def test_demo_method_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--method", "fastv"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="method"):
        demo.run_demo(method="fastv")


def test_demo_refuses_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    status, _, err = run_main(["demo", "--model", str(tmp_path)])
    assert status == 1
    assert "model_type 'bert'" in err


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """The demo's random VisionZip and TRIM models, saved and reloaded the way the demo does it, with their
    processors: {"visionzip": (model, processor), "trim": (model, processor)}."""
    directory = tmp_path_factory.mktemp("demo_models")
    demo.save_random_checkpoints(directory, torch.float32, seed=0, overrides={})
    return {name: demo._load_auto(directory / name, "cpu", torch.float32) for name in demo.REDUCTIONS}


def test_timed_prefill_matches_the_public_forward(demo_models):
    """The prefill the demo times (its own splice of the features) is what each model's forward computes
    from the full processor output, for stock LLaVA, VisionZip and TRIM."""
    from PIL import Image

    model, processor = demo_models["trim"]
    assert type(processor).__name__ == "LlavaTrimProcessor"
    image = Image.open(demo.SAMPLE_IMAGE).convert("RGB")
    inputs = processor(images=image, text=demo._prompt(processor, "Which colour is the roof?"), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    candidates = [(demo.stock_twin(model), None), (demo_models["visionzip"][0], "visionzip"), (model, "trim")]
    with torch.inference_mode():
        for candidate, name in candidates:
            model_inputs = demo._inputs_for(name, inputs)
            assert ("clip_input_ids" in model_inputs) == (name == "trim")
            runner = demo._Runner(candidate, "x", model_inputs, max_new_tokens=1)
            tokens = runner.features[0].shape[0]
            assert tokens == {None: 576, "visionzip": 64}.get(name, tokens)
            assert runner.embeds.shape[1] == inputs["input_ids"].shape[1] - 576 + tokens
            torch.testing.assert_close(runner.prefill()[:, -1], runner.forward()[:, -1], rtol=1e-4, atol=1e-4)
        assert runner.made_of == f"{tokens - 1} kept + 1 mean"


def test_twins_share_weights_with_the_model(demo_models):
    model, _ = demo_models["trim"]
    tensors = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    stock = demo.stock_twin(model)
    visionzip = twin(model, LlavaVisionZipForConditionalGeneration, dominant_tokens=108, contextual_tokens=20)
    assert type(stock).__name__ == "LlavaForConditionalGeneration"
    assert (visionzip.config.dominant_tokens, visionzip.config.contextual_tokens) == (108, 20)
    assert not hasattr(stock.config, "clip_text_config") and not hasattr(visionzip.config, "trim_iqr_multiplier")
    for candidate in (stock, visionzip):
        shared = {name: tensor.data_ptr() for name, tensor in candidate.state_dict().items()}
        assert shared == {name: pointer for name, pointer in tensors.items() if name in shared}
        clip_only = [n for n in tensors if "clip_text_model" in n or "visual_projection" in n]
        assert len(shared) == len(tensors) - len(clip_only)


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_demo_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--model", "--random", "--method", "--clip", "--dominant-tokens", "--contextual-tokens", "--device",
                   "--dtype", "--output"):
        assert option in help_text


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_missing_image_fails_cleanly(tmp_path, capsys):
    assert cli.main(["demo", "--image", str(tmp_path / "nope.png")]) == 1
    assert "image not found" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "llava_token_reduction", "--help"], capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "llava-token-reduction" in result.stdout



@pytest.mark.parametrize("trim", [False, True], ids=["stock", "trim"])
def test_demo_model_does_not_run_the_checkpoints_code(stock_llava_dir, tiny_trim_dir, tmp_path, trim):
    """`demo --model DIR` loads DIR with this package's classes only: an `auto_map` entry DIR's tokenizer config
    plants (hub form, "<dir>--module.Class") is not imported unless --trust-remote-code is given."""
    directory = shutil.copytree(tiny_trim_dir if trim else stock_llava_dir, tmp_path / "checkpoint")
    marker = tmp_path / "MARKER"
    (directory / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass Evil(PreTrainedTokenizerFast):\n    pass\n"
    )
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": [None, f"{directory}--evil.Evil"]}
    config_path.write_text(json.dumps(config))
    method = ["--method", "trim"] if trim else ["--method", "visionzip"]
    status, out, err = run_main(["demo", *QUICK, "--model", str(directory), *method])
    assert status == 0, err
    assert not marker.exists()
