"""The command line and its `demo` command: help, exit codes, the printed table, the saved checkpoint."""

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import torch

from llava_token_reduction import cli, demo


# Few repeats and tokens keep the whole file fast; the numbers checked here do not depend on them.
QUICK = ["--repeats", "1", "--max-new-tokens", "3"]


def table_row(output: str, label: str) -> list[str]:
    """The cells after `label` in the demo's table."""
    for line in output.splitlines():
        if line.startswith(label):
            return line[len(label):].split()
    raise AssertionError(f"no table row {label!r} in:\n{output}")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One default demo run, in-process, keeping its checkpoint: (exit status, stdout, stderr, directory)."""
    directory = tmp_path_factory.mktemp("demo_checkpoint")
    status, out, err = run_main(["demo", *QUICK, "--output", str(directory)])
    return status, out, err, directory


def run_main(argv):
    """`cli.main(argv)` in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def test_demo_prints_token_counts_before_and_after(demo_run):
    status, out, _, _ = demo_run
    assert status == 0
    assert "random weights" in out and "gibberish" in out
    assert "stock LLaVA" in out and "VisionZip 54+10" in out
    assert table_row(out, "image tokens per image")[:2] == ["576", "64"]
    before, after = (int(cell) for cell in table_row(out, "sequence seen by the LM")[:2])
    assert before - after == 576 - 64
    for label in ("vision tower + projector (ms)", "LM prefill (ms)", "whole forward pass (ms)"):
        cells = table_row(out, label)
        assert float(cells[0]) > 0 and float(cells[1]) > 0, label
    assert re.search(r"^VisionZip 54\+10: '.*'$", out, flags=re.MULTILINE)


def test_demo_reports_progress_on_stderr(demo_run):
    _, out, err, _ = demo_run
    assert "building a small LLaVA with random weights" in err
    assert "demo:" not in out


def test_demo_keeps_a_loadable_visionzip_checkpoint(demo_run):
    _, out, _, directory = demo_run
    assert str(directory) in out
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llava_visionzip"
    assert (config["dominant_tokens"], config["contextual_tokens"]) == (54, 10)
    assert {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"} <= set(config["auto_map"])
    assert (directory / "processor_config.json").is_file()
    assert (directory / "modeling_llava_visionzip.py").is_file()


def test_demo_budget_overrides():
    status, out, err = run_main(["demo", *QUICK, "--dominant-tokens", "108", "--contextual-tokens", "20"])
    assert status == 0, err
    assert table_row(out, "image tokens per image")[:2] == ["576", "128"], err
    assert "VisionZip 108+20" in out


def test_demo_on_a_stock_llava_checkpoint(stock_llava_dir, tmp_path):
    """`--model` takes a stock LLaVA checkpoint (here a tiny local one: 64 patches), loads it as VisionZip with
    the budget overrides, and `--output` saves the VisionZip checkpoint."""
    output = tmp_path / "visionzip"
    status, out, err = run_main([
        "demo", *QUICK, "--model", str(stock_llava_dir), "--dominant-tokens", "10", "--contextual-tokens", "4",
        "--output", str(output),
    ])
    assert status == 0, err
    assert "random weights" not in out
    assert table_row(out, "image tokens per image")[:2] == ["64", "14"]
    assert "VisionZip 10+4" in out
    assert "model of type `llava`" not in err
    config = json.loads((output / "config.json").read_text())
    assert (config["model_type"], config["dominant_tokens"], config["contextual_tokens"]) == ("llava_visionzip", 10, 4)


def test_demo_refuses_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    status, _, err = run_main(["demo", "--model", str(tmp_path)])
    assert status == 1
    assert "model_type 'bert'" in err


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """The demo's random VisionZip model, saved and reloaded the way the demo does it, with its processor."""
    directory = tmp_path_factory.mktemp("demo_model")
    demo._save_random_checkpoint(directory, torch.float32, seed=0, overrides={})
    return demo._load_auto(directory, "cpu", torch.float32)


def test_timed_prefill_matches_the_public_forward(demo_model):
    """The prefill the demo times (its own splice of the features) is what each model's forward computes
    from the full processor output."""
    from PIL import Image

    model, processor = demo_model
    image = Image.open(demo.SAMPLE_IMAGE).convert("RGB")
    inputs = processor(images=image, text=demo._prompt(processor, "Which colour is the roof?"), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576
    with torch.inference_mode():
        for candidate, tokens in ((demo.stock_twin(model), 576), (model, 64)):
            runner = demo._Runner(candidate, "x", inputs, max_new_tokens=1)
            assert runner.features[0].shape[0] == tokens
            assert runner.embeds.shape[1] == inputs["input_ids"].shape[1] - 576 + tokens
            torch.testing.assert_close(runner.prefill()[:, -1], runner.forward()[:, -1], rtol=1e-4, atol=1e-4)


def test_stock_twin_shares_weights_with_the_model(demo_model):
    model, _ = demo_model
    twin = demo.stock_twin(model)
    assert type(twin).__name__ == "LlavaForConditionalGeneration"
    twin_tensors = {name: tensor.data_ptr() for name, tensor in twin.state_dict().items()}
    assert twin_tensors == {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}


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
    for option in ("--model", "--dominant-tokens", "--contextual-tokens", "--device", "--dtype", "--output"):
        assert option in help_text


def test_no_command_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_invalid_budget_fails_with_one_line_reason(capsys):
    assert cli.main(["demo", "--dominant-tokens", "0"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "dominant_tokens" in err
    assert "Traceback" not in err


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

