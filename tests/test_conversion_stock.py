"""`convert visionzip|trim` from stock transformers LLaVA checkpoints (+ a CLIP checkpoint for TRIM): round trips,
options, the output's safety (temporary directory, overwrite), hub plumbing, and every error path."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import llava_token_reduction.conversion.converter as converter
import llava_token_reduction.conversion.write as conversion_write
from conversion_inputs import save_clip, save_stock, vision_state_of
from llava_token_reduction import cli as top_cli
from llava_token_reduction.conversion import ConversionError, convert_trim, convert_visionzip
from llava_token_reduction.conversion.cli import main as conversion_main


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stock") / "llava-tiny-hf"
    model = save_stock(directory)
    return directory, model


@pytest.fixture(scope="module")
def clip_dir(stock, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip") / "clip-tiny"
    model = save_clip(directory, vision_state_of(stock[1]))
    return directory, model


@pytest.fixture(scope="module")
def other_clip_dir(tmp_path_factory):
    """A CLIP checkpoint whose vision weights are not the LLaVA's."""
    directory = tmp_path_factory.mktemp("clip_other") / "clip-other"
    return directory, save_clip(directory, None, seed=11)


def _cli(capsys, *argv):
    status = conversion_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _leftovers(parent, name):
    return [p for p in os.listdir(parent) if p.startswith(f".{name}.")]


def _load(directory):
    model, info = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True,
                                                              output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model, AutoProcessor.from_pretrained(directory, trust_remote_code=True)


def _assert_same_llava_weights(converted, source):
    got, want = converted.state_dict(), source.state_dict()
    for key, value in want.items():
        assert torch.equal(got[key].to(value.dtype), value), key


# Round trips ---------------------------------------------------------------------------------------


def test_stock_to_visionzip_round_trip(stock, tmp_path, capsys):
    src, source_model = stock
    out = tmp_path / "vz"
    status, stdout, stderr = _cli(capsys, "visionzip", src, out, "--dominant-tokens", 10, "--contextual-tokens", 4,
                                  "--max-shard-size", "100KB", "--no-progress")
    assert status == 0, stderr
    assert "Wrote and verified" in stdout and "parameters:" in stdout and "shard(s)" in stdout
    model, processor = _load(out)
    assert type(model).__name__ == "LlavaVisionZipForConditionalGeneration"
    assert (model.config.dominant_tokens, model.config.contextual_tokens) == (10, 4)
    _assert_same_llava_weights(model, source_model)
    assert set(model.state_dict()) == set(source_model.state_dict())
    assert type(processor).__name__ == "LlavaProcessor"
    assert processor.image_token_id == model.config.image_token_id
    files = set(os.listdir(out))
    assert {"README.md", "config.json", "model.safetensors.index.json", "modeling_llava_visionzip.py"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded per --max-shard-size
    saved = json.loads((out / "config.json").read_text())
    assert set(saved["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    assert not _leftovers(tmp_path, "vz")
    # The converted model reduces: 14 image tokens reach the language model.
    image = torch.rand(1, 3, 56, 56)
    features = model.model.get_image_features(pixel_values=image).pooler_output
    assert features[0].shape[0] == 14


def test_stock_to_trim_round_trip(stock, clip_dir, tmp_path, capsys):
    src, source_model = stock
    clip, clip_model = clip_dir
    out = tmp_path / "trim"
    status, stdout, stderr = _cli(capsys, "trim", src, out, "--clip", clip, "--no-progress")
    assert status == 0, stderr
    assert "CLIP text tower" in stdout and "visual_projection" in stdout and "CLIP tokenizer" in stdout
    model, processor = _load(out)
    assert type(model).__name__ == "LlavaTrimForConditionalGeneration"
    _assert_same_llava_weights(model, source_model)
    state = model.state_dict()
    for key, value in clip_model.state_dict().items():
        if key.startswith("text_model."):
            assert torch.equal(state["model.clip_text_model." + key], value), key
    assert torch.equal(state["model.clip_text_model.text_projection.weight"], clip_model.text_projection.weight)
    assert torch.equal(state["model.visual_projection.weight"], clip_model.visual_projection.weight)
    assert model.config.projection_dim == clip_model.config.projection_dim
    assert type(processor).__name__ == "LlavaTrimProcessor"
    assert processor.image_token_id == model.config.image_token_id
    inputs = processor(images=[torch.rand(3, 56, 56)], text="USER: <image>\nWhat is red? ASSISTANT:",
                       return_tensors="pt", do_rescale=False)
    assert inputs["clip_input_ids"].shape == (1, 77)
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
    assert "training-free" in stdout  # the summary warns about TRIM on weights not trained with it
    assert "not trained with TRIM" in (out / "README.md").read_text()


def test_dtype_option_stores_every_float_tensor_in_it(stock, clip_dir, tmp_path):
    out = tmp_path / "trim_bf16"
    result = convert_trim(stock[0], out, clip=str(clip_dir[0]), dtype="bfloat16", progress=False)
    assert result.dtype == torch.bfloat16
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert dtypes == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16)
    # CLIP's text tower is kept in fp32 at load time, with the stored (bf16-rounded) values.
    text_weight = model.model.clip_text_model.text_projection.weight
    assert text_weight.dtype == torch.float32
    assert torch.equal(text_weight, clip_dir[1].text_projection.weight.to(torch.bfloat16).float())


def test_hub_id_source_is_downloaded(stock, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns or ())))
        return str(stock[0])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    out = tmp_path / "from_hub"
    convert_visionzip("acme/llava-tiny-hf", out, dominant_tokens=10, contextual_tokens=4, progress=False)
    assert calls and calls[0][0] == "acme/llava-tiny-hf" and "*.safetensors" in calls[0][1]
    readme = (out / "README.md").read_text()
    assert "base_model:\n- \"acme/llava-tiny-hf\"" in readme


def test_push_to_hub_uploads_only_after_verification(stock, tmp_path, monkeypatch, capsys):
    events = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            events.append(("create", repo_id))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            events.append(("upload", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = tmp_path / "pushed"
    status, stdout, stderr = _cli(capsys, "visionzip", stock[0], out, "--dominant-tokens", 10, "--contextual-tokens", 4,
                                  "--push-to-hub", "acme/tiny-vz", "--no-progress")
    assert status == 0, stderr
    assert events[0] == ("create", "acme/tiny-vz") and events[1][:2] == ("upload", "acme/tiny-vz")
    assert "config.json" in events[1][2] and converter.INCOMPLETE_MARKER not in events[1][2]
    assert 'model_id = "acme/tiny-vz"' in (out / "README.md").read_text()

    events.clear()

    def failing_verify(plan, built, directory):
        raise ConversionError("verification failed: simulated")

    monkeypatch.setattr(conversion_write, "verify_checkpoint", failing_verify)
    status, _, stderr = _cli(capsys, "visionzip", stock[0], tmp_path / "not_pushed", "--push-to-hub", "acme/x",
                             "--no-progress")
    assert status == 1 and "verification failed" in stderr
    assert events == [] and not (tmp_path / "not_pushed").exists()


def test_top_level_command_line_has_convert(stock, tmp_path, capsys):
    out = tmp_path / "via_top"
    status = top_cli.main(["convert", "visionzip", str(stock[0]), str(out), "--dominant-tokens", "10",
                           "--contextual-tokens", "4", "--no-progress"])
    assert status == 0 and (out / "config.json").is_file()
    capsys.readouterr()


# Output safety -------------------------------------------------------------------------------------


def test_existing_output_is_refused_without_overwrite(stock, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, stdout, stderr = _cli(capsys, "visionzip", stock[0], out, "--no-progress")
    assert status == 1 and "--overwrite" in stderr and len(stderr.strip().splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only an earlier output of this tool (tests/test_conversion_output_safety.py).
    status, _, stderr = _cli(capsys, "visionzip", stock[0], out, "--overwrite", "--no-progress")
    assert status == 1 and "not a VisionZip/TRIM checkpoint" in stderr
    assert (out / "keep.txt").read_text() == "mine" and not _leftovers(tmp_path, "exists")


@pytest.mark.parametrize("step", ["_write_processor", "_write_model_card"])
def test_interrupted_write_leaves_no_output(stock, tmp_path, monkeypatch, capsys, step):
    def explode(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(conversion_write, step, explode)
    out = tmp_path / "interrupted"
    status, _, stderr = _cli(capsys, "visionzip", stock[0], out, "--no-progress")
    assert status == 1 and "disk full" in stderr
    assert not out.exists() and not _leftovers(tmp_path, "interrupted")


def test_keyboard_interrupt_leaves_no_output(stock, tmp_path, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion_write, "_write_model_card", interrupt)
    out = tmp_path / "ctrl_c"
    status, _, stderr = _cli(capsys, "visionzip", stock[0], out, "--no-progress")
    assert status == 130 and "interrupted" in stderr
    assert not out.exists() and not _leftovers(tmp_path, "ctrl_c")


def test_killed_process_leaves_only_a_marked_hidden_directory(stock, tmp_path):
    """A hard kill (no cleanup runs) mid-write: OUT does not exist; the partial directory is hidden and marked."""
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os
        import llava_token_reduction.conversion.write as conversion_write
        original = conversion_write._write_model
        def write_then_die(model, directory, max_shard_size):
            original(model, directory, max_shard_size)
            os._exit(9)
        conversion_write._write_model = write_then_die
        from llava_token_reduction.conversion.cli import main
        main(["visionzip", {str(stock[0])!r}, {str(out)!r}, "--no-progress"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 9, result.stderr
    assert not out.exists()
    partial = _leftovers(tmp_path, "killed")
    assert len(partial) == 1 and "partial" in partial[0]
    assert (tmp_path / partial[0] / converter.INCOMPLETE_MARKER).is_file()


# Errors --------------------------------------------------------------------------------------------


def _one_line_error(capsys, *argv):
    status, stdout, stderr = _cli(capsys, *argv, "--no-progress")
    assert status == 1, stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_clip_mismatch_is_refused_unless_forced(stock, other_clip_dir, tmp_path, capsys):
    out = tmp_path / "mismatch"
    line = _one_line_error(capsys, "trim", stock[0], out, "--clip", other_clip_dir[0])
    assert "vision weights differ" in line and "--force" in line
    assert not out.exists() and not _leftovers(tmp_path, "mismatch")
    status, stdout, stderr = _cli(capsys, "trim", stock[0], out, "--clip", other_clip_dir[0], "--force",
                                  "--no-progress")
    assert status == 0, stderr
    assert "WARNING (--force)" in stdout
    assert "WARNING (--force)" in (out / "README.md").read_text()  # the published card says so too
    model, _ = _load(out)
    _assert_same_llava_weights(model, stock[1])  # SRC's vision tower is kept


def test_trim_from_stock_needs_clip(stock, tmp_path, capsys):
    line = _one_line_error(capsys, "trim", stock[0], tmp_path / "o")
    assert "--clip" in line


def test_missing_source_files(stock, tmp_path, capsys):
    assert "not found" in _one_line_error(capsys, "visionzip", tmp_path / "nowhere", tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "config.json" in _one_line_error(capsys, "visionzip", empty, tmp_path / "o")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(stock[0], no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert "has no weights" in _one_line_error(capsys, "visionzip", no_weights, tmp_path / "o")
    missing_shard = tmp_path / "missing_shard"
    shutil.copytree(stock[0], missing_shard)
    keys = list(load_file(missing_shard / "model.safetensors"))
    (missing_shard / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}})
    )
    assert "missing" in _one_line_error(capsys, "visionzip", missing_shard, tmp_path / "o")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(stock[0], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "processor_config.json",
                                                                          "preprocessor_config.json"))
    assert "processor" in _one_line_error(capsys, "visionzip", no_tokenizer, tmp_path / "o")
    projector = _one_line_error(capsys, "visionzip", stock[0], tmp_path / "o", "--projector", tmp_path / "nope.bin")
    assert "not found" in projector
    assert not (tmp_path / "o").exists()


def test_wrong_architecture(stock, clip_dir, tmp_path, capsys):
    line = _one_line_error(capsys, "visionzip", clip_dir[0], tmp_path / "o")
    assert "'clip'" in line and "expected a LLaVA checkpoint" in line
    converted = tmp_path / "already"
    convert_visionzip(stock[0], converted, dominant_tokens=10, contextual_tokens=4, progress=False)
    assert "already converted" in _one_line_error(capsys, "visionzip", converted, tmp_path / "o")
    line = _one_line_error(capsys, "trim", stock[0], tmp_path / "o", "--clip", stock[0])
    assert "expected a CLIPModel checkpoint" in line


def _tampered_copy(src, directory, change):
    shutil.copytree(src, directory)
    state = load_file(directory / "model.safetensors")
    change(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_unmapped_missing_and_mismatched_keys(stock, tmp_path, capsys):
    extra = _tampered_copy(stock[0], tmp_path / "extra", lambda s: s.update({"adapter.scale": torch.ones(3)}))
    line = _one_line_error(capsys, "visionzip", extra, tmp_path / "o")
    assert "unmapped keys" in line and "adapter.scale" in line

    def drop(state):
        del state[next(k for k in state if k.endswith("post_layernorm.weight"))]
        del state["multi_modal_projector.linear_2.bias"]

    missing = _tampered_copy(stock[0], tmp_path / "missing", drop)
    line = _one_line_error(capsys, "visionzip", missing, tmp_path / "o")
    assert "missing keys" in line and "model.multi_modal_projector.linear_2.bias" in line
    assert "post_layernorm.weight" in line

    def widen(state):
        state["multi_modal_projector.linear_1.bias"] = torch.zeros(5)

    mismatched = _tampered_copy(stock[0], tmp_path / "mismatched", widen)
    line = _one_line_error(capsys, "visionzip", mismatched, tmp_path / "o")
    assert "shape mismatch" in line and "linear_1.bias" in line
    assert not (tmp_path / "o").exists()


def test_invalid_budget_is_reported(stock, tmp_path, capsys):
    line = _one_line_error(capsys, "visionzip", stock[0], tmp_path / "o", "--dominant-tokens", 60,
                           "--contextual-tokens", 30)
    assert "contextual_tokens" in line


def test_output_may_not_replace_the_source(stock, tmp_path, capsys):
    copy = tmp_path / "src_copy"
    shutil.copytree(stock[0], copy)
    line = _one_line_error(capsys, "visionzip", copy, copy, "--overwrite")
    assert "would replace SRC" in line or "not a VisionZip/TRIM checkpoint" in line
    assert (copy / "model.safetensors").is_file()


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "llava_token_reduction.conversion", "trim", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--clip" in result.stdout and "--max-shard-size" in result.stdout


def test_request_validation():
    with pytest.raises(ConversionError, match="unknown method"):
        converter.convert(converter.ConversionRequest(method="prune", src="a", out="b"))
    with pytest.raises(ConversionError, match="--dtype"):
        converter.convert(converter.ConversionRequest(method="trim", src="a", out="b", dtype="int8"))


def test_output_may_not_replace_the_clip_checkpoint_or_projector(stock, clip_dir, tmp_path, capsys):
    # --overwrite replaces OUT after the conversion: inputs inside it would be deleted.
    out = tmp_path / "inputs_inside"  # an earlier output, which --overwrite may replace
    assert _cli(capsys, "visionzip", stock[0], out, "--no-progress")[0] == 0
    shutil.copytree(clip_dir[0], out / "clip")
    line = _one_line_error(capsys, "trim", stock[0], out, "--clip", out / "clip", "--overwrite")
    assert "would replace the CLIP checkpoint" in line and (out / "clip" / "config.json").is_file()
    projector = out / "mm_projector.safetensors"
    save_file({k: v.contiguous() for k, v in load_file(stock[0] / "model.safetensors").items()
               if k.startswith("multi_modal_projector.")}, projector)
    line = _one_line_error(capsys, "visionzip", stock[0], out, "--projector", projector, "--overwrite")
    assert "would replace the projector file" in line and projector.is_file()


def test_interrupted_upload_reports_the_written_output(stock, tmp_path, monkeypatch, capsys):
    class InterruptedApi:
        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setattr("huggingface_hub.HfApi", InterruptedApi)
    out = tmp_path / "written"
    status, _, stderr = _cli(capsys, "visionzip", stock[0], out, "--push-to-hub", "acme/x", "--no-progress")
    assert status == 1 and "nothing was written" not in stderr
    assert "written and verified" in stderr and "interrupted" in stderr and len(stderr.strip().splitlines()) == 1
    assert (out / "config.json").is_file()
