"""Projector tuning end to end on tiny VisionZip and TRIM checkpoints and a synthetic dataset: the loss falls,
only the trainable parameters change, resume continues the same run, the output reloads and generates, and bad
data stops the command before training (or is skipped and counted)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from llava_token_reduction.tuning.train import main
from tuning_support import build_checkpoint, conversation, write_dataset


STEPS = 30


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate():
    """Tiny matrices run far faster on one thread (and do not fight other processes for two cores); every run
    builds its own Accelerator, so the process-wide accelerate state is reset around each test."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuning_checkpoints")
    return {kind: build_checkpoint(kind, root / kind) for kind in ("visionzip", "trim")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tuning_data"), count=4)


def tune(model, data, out, *extra):
    data_file, folder = data
    argv = ["--model", str(model), "--data", str(data_file), "--image-folder", str(folder), "--output-dir", str(out),
            "--no-progress", "--traceback", *map(str, extra)]
    return main(argv)


def logged_losses(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def model_weights(directory):
    weights = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


@pytest.fixture(scope="module")
def overfit_runs(checkpoints, dataset, tmp_path_factory):
    """30 full-batch steps at lr 1e-2 on the 4 samples: VisionZip tunes the projector, TRIM the projector + LLM."""
    runs = {}
    for kind, trainable in (("visionzip", "projector"), ("trim", "projector+llm")):
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(1)
        out = tmp_path_factory.mktemp(f"tuned_{kind}")
        status = tune(checkpoints[kind], dataset, out, "--trainable", trainable, "--max-steps", STEPS,
                      "--per-device-batch-size", 4, "--lr", "1e-2", "--lr-scheduler", "constant", "--warmup-ratio", 0,
                      "--logging-steps", 10)
        assert status == 0
        runs[kind] = out
    return runs


@pytest.mark.parametrize("kind", ["visionzip", "trim"])
def test_loss_goes_down(overfit_runs, kind):
    losses = [r["loss"] for r in logged_losses(overfit_runs[kind])]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{kind} loss curve: " + " ".join(f"{value:.3f}" for value in losses))
    assert last < 0.85 * first, losses
    assert min(losses[-5:]) < losses[0]


# Saved checkpoints use llava-hf's on-disk names (`multi_modal_projector.*`, `language_model.model.*`,
# `language_model.lm_head.*`), as transformers writes LLaVA checkpoints.
@pytest.mark.parametrize("kind,trainable_prefixes", [
    ("visionzip", ("multi_modal_projector.",)),
    ("trim", ("multi_modal_projector.", "language_model.")),
])
def test_only_trainable_parameters_change(checkpoints, overfit_runs, kind, trainable_prefixes):
    before, after = model_weights(checkpoints[kind]), model_weights(overfit_runs[kind] / "model")
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "nothing was trained"
    assert all(name.startswith(trainable_prefixes) for name in changed), sorted(changed)[:5]
    assert {n for n in changed if n.startswith("multi_modal_projector.")} == {
        f"multi_modal_projector.linear_{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
    frozen = [n for n in before if not n.startswith(trainable_prefixes)]
    assert any("vision_tower" in n for n in frozen)
    if kind == "trim":
        assert any("clip_text_model" in n for n in frozen) and any("visual_projection" in n for n in frozen)
        assert any(n.startswith("language_model.model.") for n in changed)
        assert "language_model.lm_head.weight" in changed
    summary = json.loads((overfit_runs[kind] / "summary.json").read_text())
    assert summary["verified"] is True and summary["steps"] == STEPS


@pytest.mark.parametrize("kind", ["visionzip", "trim"])
def test_projector_file_matches_the_checkpoint_which_loads_and_generates(overfit_runs, dataset, kind):
    out = overfit_runs[kind]
    projector = load_file(str(out / "projector.safetensors"))
    assert set(projector) == {f"multi_modal_projector.linear_{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
    model = AutoModelForImageTextToText.from_pretrained(out / "model").eval()
    assert model.config.model_type == f"llava_{kind}"
    for name, tensor in projector.items():
        assert torch.equal(model.state_dict()["model." + name], tensor)
    processor = AutoProcessor.from_pretrained(out / "model")
    image = Image.open(dataset[1] / "images" / "sample0.png")
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What colour is this picture?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_resume_continues_to_the_same_weights(checkpoints, dataset, tmp_path):
    """6 steps (batch 1, accumulation 2: 2 steps an epoch) with a state saved at step 3, mid-epoch. Resuming a
    copy of that state must log steps 4..6 and end on the uninterrupted run's weights."""
    common = ("--max-steps", 6, "--per-device-batch-size", 1, "--gradient-accumulation-steps", 2, "--lr", "5e-3",
              "--save-steps", 3, "--seed", 7)
    full = tmp_path / "full"
    assert tune(checkpoints["visionzip"], dataset, full, *common) == 0
    saved = json.loads((full / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert (saved["global_step"], saved["epoch"], saved["batch_in_epoch"]) == (3, 1, 2)
    state_weights = load_file(str(full / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert all(name.startswith("model.multi_modal_projector.") for name in state_weights)  # frozen weights not copied

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert tune(checkpoints["visionzip"], dataset, resumed, *common, "--resume-from-checkpoint", "latest") == 0
    assert [r["step"] for r in logged_losses(resumed)] == [4, 5, 6]
    full_losses = {r["step"]: r["loss"] for r in logged_losses(full)}
    for record in logged_losses(resumed):
        assert record["loss"] == pytest.approx(full_losses[record["step"]], rel=1e-5)
    expected, got = load_file(str(full / "projector.safetensors")), load_file(str(resumed / "projector.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with pytest.raises(Exception, match="cannot resume .* seed was 7, now 8"):
        tune(checkpoints["visionzip"], dataset, resumed, *common[:-1], 8, "--resume-from-checkpoint",
             full / "checkpoints" / "step-00000003")


def test_bad_data_stops_before_training(checkpoints, tmp_path, capsys):
    data_file, folder = write_dataset(tmp_path / "data", count=2, extra_records=[
        dict(conversation("bad", "red"), image="images/gone.png")])
    out = tmp_path / "out"
    argv = ["--model", str(checkpoints["visionzip"]), "--data", str(data_file), "--image-folder", str(folder),
            "--output-dir", str(out), "--no-progress", "--max-steps", 2]
    assert main(list(map(str, argv))) == 1
    error = capsys.readouterr().err
    assert "record 2, id bad: image file not found" in error and "--skip-bad-records" in error
    assert not (out / "log.jsonl").exists()

    AcceleratorState = pytest.importorskip("accelerate.state").AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(list(map(str, argv)) + ["--skip-bad-records"]) == 0
    stdout = capsys.readouterr().out
    assert "1 bad record(s) skipped" in stdout and "skipped 1 bad record(s)" in stdout
    assert [json.loads(line)["id"] for line in (out / "bad_records.jsonl").read_text().splitlines()] == ["bad"]
    assert [r["id"] for r in json.loads((out / "subset.json").read_text())["records"]] == ["sample0", "sample1"]


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "llava_token_reduction.tuning", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--trainable" in result.stdout and "--resume-from-checkpoint" in result.stdout


def test_console_command_has_tune(capsys):
    from llava_token_reduction.cli import main as cli_main

    with pytest.raises(SystemExit) as raised:
        cli_main(["tune", "--help"])
    assert raised.value.code == 0 and "--trainable" in capsys.readouterr().out


@pytest.mark.parametrize("limit", [0, -1])
def test_save_total_limit_below_one_is_refused(checkpoints, dataset, tmp_path, capsys, limit):
    data_file, folder = dataset
    argv = ["--model", checkpoints["visionzip"], "--data", data_file, "--image-folder", folder, "--output-dir",
            tmp_path / "out", "--no-progress", "--max-steps", 2, "--save-steps", 1, "--save-total-limit", limit]
    assert main(list(map(str, argv))) == 1
    assert f"--save-total-limit must be >= 1 (or left out to keep every state), got {limit}" in capsys.readouterr().err


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _truncated_jpeg(path):
    """A JPEG whose header is intact (PIL's `verify`, the default start-up check, accepts it) but whose data
    stops half way, so decoding fails."""
    from PIL import Image

    from tuning_support import write_image

    write_image(path.with_suffix(".png"), (200, 100, 50), size=(64, 64))
    Image.open(path.with_suffix(".png")).convert("RGB").save(path, "JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with Image.open(path) as image:
        image.verify()
    with pytest.raises(OSError), Image.open(path) as image:
        image.convert("RGB")
    return path


def test_undecodable_image_is_skipped_and_the_resume_matches(checkpoints, tmp_path, capsys):
    """With --skip-bad-records a record whose image fails only when decoded is replaced by the next readable
    one, logged and counted; a resume from a state saved before it keeps the data fingerprint, does not open
    that image again, and ends on the uninterrupted run's weights."""
    data_file, folder = write_dataset(tmp_path / "data", count=3, extra_records=[
        dict(conversation("broken", "red"), image="images/broken.jpg")])
    _truncated_jpeg(folder / "images" / "broken.jpg")
    common = ("--max-steps", 8, "--per-device-batch-size", 1, "--lr", "5e-3", "--save-steps", 2, "--seed", 3,
              "--skip-bad-records")
    full = tmp_path / "full"
    assert tune(checkpoints["visionzip"], (data_file, folder), full, *common) == 0  # was: DataError mid-epoch
    captured = capsys.readouterr()
    logged = [json.loads(line) for line in (full / "unreadable_images.jsonl").read_text().splitlines()]
    assert {entry["id"] for entry in logged} == {"broken"} and "broken.jpg" in captured.err
    assert json.loads((full / "summary.json").read_text())["unreadable_images_skipped"] == 1
    assert "did not decode" in captured.out

    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("model", "projector.safetensors", "summary.json"))
    for state in sorted((resumed / "checkpoints").iterdir())[1:]:
        shutil.rmtree(state)  # keep the first saved state (step 2) only
    _reset_accelerate()
    assert tune(checkpoints["visionzip"], (data_file, folder), resumed, *common, "--resume-from-checkpoint",
                "latest") == 0
    captured = capsys.readouterr()
    assert "broken.jpg" not in captured.err  # known from the log: not opened again
    expected, got = load_file(str(full / "projector.safetensors")), load_file(str(resumed / "projector.safetensors"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)


def test_truncated_state_file_is_named_and_latest_falls_back(checkpoints, dataset, tmp_path, capsys):
    common = ("--max-steps", 4, "--per-device-batch-size", 2, "--save-steps", 1, "--save-total-limit", 4)
    out = tmp_path / "run"
    assert tune(checkpoints["visionzip"], dataset, out, *common) == 0
    states = sorted((out / "checkpoints").iterdir())
    last = states[-1] / "trainer_state.json"
    last.write_text(last.read_text()[:20])  # cut short, as by a crash while writing
    _reset_accelerate()
    with pytest.raises(Exception, match=f"{last}.*unreadable"):
        tune(checkpoints["visionzip"], dataset, out, *common, "--resume-from-checkpoint", states[-1])
    _reset_accelerate()
    capsys.readouterr()
    assert tune(checkpoints["visionzip"], dataset, out, *common, "--resume-from-checkpoint", "latest") == 0
    captured = capsys.readouterr()
    assert str(last) in captured.err and "previous saved state" in captured.err
    assert f"resumed from {states[-2]}" in captured.out


def test_tune_refuses_a_checkpoint_whose_weights_did_not_all_load(checkpoints, dataset, tmp_path, capsys):
    """Before the shared loader, `tune` trained on a randomly initialised projector without a word."""
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["visionzip"], broken)
    weights = load_file(broken / "model.safetensors")
    del weights[next(name for name in weights if "multi_modal_projector" in name)]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    data_file, folder = dataset
    argv = ["--model", broken, "--data", data_file, "--image-folder", folder, "--output-dir", tmp_path / "out",
            "--no-progress", "--max-steps", 1]
    assert main(list(map(str, argv))) == 1
    assert "did not load cleanly: 1 missing" in capsys.readouterr().err
