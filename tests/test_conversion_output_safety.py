"""`convert ... OUT [--overwrite]` never destroys a user's files, and after Ctrl-C at any stage its message is
true and its leftovers are removed or named."""

import os
import shutil
import signal

import pytest

import llava_token_reduction.conversion.output_place as output_place
from conversion_inputs import save_stock
from llava_token_reduction.conversion.cli import main as conversion_main


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stock") / "llava-tiny-hf"
    save_stock(directory)
    return directory


@pytest.fixture(scope="module")
def previous_output(stock, tmp_path_factory):
    """A checkpoint an earlier `convert visionzip` wrote (what --overwrite is for)."""
    directory = tmp_path_factory.mktemp("previous") / "out"
    assert conversion_main(["visionzip", str(stock), str(directory), "--no-progress", "--dominant-tokens", "20"]) == 0
    return directory


def _cli(capsys, *argv):
    status = conversion_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _project(directory):
    """A user's project: files that must survive."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.py").write_text("important")
    (directory / "data").mkdir(exist_ok=True)
    (directory / "data" / "notes.txt").write_text("more")
    return directory


def _intact(directory):
    return ((directory / "train.py").read_text() == "important"
            and (directory / "data" / "notes.txt").read_text() == "more")


def _hidden(parent, name="out"):
    return sorted(p for p in os.listdir(parent) if p.startswith(f".{name}."))


@pytest.mark.parametrize("out", ["", "  ", "."])
def test_empty_or_dot_out_is_refused_in_the_working_directory(stock, tmp_path, monkeypatch, capsys, out):
    project = _project(tmp_path / "project")
    monkeypatch.chdir(project)
    status, _, stderr = _cli(capsys, "visionzip", stock, out, "--overwrite", "--no-progress")
    assert status == 1 and len(stderr.strip().splitlines()) == 1
    assert ("empty" in stderr) if not out.strip() else ("working directory" in stderr)
    assert _intact(project) and sorted(os.listdir(project)) == ["data", "train.py"]


def test_home_and_ancestors_of_the_working_directory_are_refused(stock, tmp_path, monkeypatch, capsys):
    home = _project(tmp_path / "home" / "user")
    monkeypatch.setenv("HOME", str(home))
    work = _project(home / "work" / "repo")
    monkeypatch.chdir(work / "data")
    for out in ("~", str(home), str(work), "..", str(tmp_path)):
        status, _, stderr = _cli(capsys, "visionzip", stock, out, "--overwrite", "--no-progress")
        assert status == 1 and ("home directory" in stderr or "working directory" in stderr), (out, stderr)
    assert _intact(home) and _intact(work)


def test_overwrite_replaces_only_a_checkpoint_this_tool_wrote(stock, previous_output, tmp_path, capsys):
    project = _project(tmp_path / "out")
    status, _, stderr = _cli(capsys, "visionzip", stock, project, "--overwrite", "--no-progress")
    assert status == 1 and "not a VisionZip/TRIM checkpoint" in stderr
    assert _intact(project)
    # A stock checkpoint is not ours either.
    stock_copy = shutil.copytree(stock, tmp_path / "stock-copy")
    status, _, stderr = _cli(capsys, "visionzip", stock, stock_copy, "--overwrite", "--no-progress")
    assert status == 1 and "not a VisionZip/TRIM checkpoint" in stderr
    assert sorted(os.listdir(stock_copy)) == sorted(os.listdir(stock))
    # An earlier output is replaced.
    out = shutil.copytree(previous_output, tmp_path / "again")
    status, stdout, stderr = _cli(capsys, "visionzip", stock, out, "--overwrite", "--no-progress")
    assert status == 0, stderr
    assert '"dominant_tokens": 54' in (out / "config.json").read_text() and not _hidden(tmp_path, "again")


def test_symlinked_out_is_not_followed(stock, previous_output, tmp_path, capsys):
    target = shutil.copytree(previous_output, tmp_path / "target")
    (target / "mine.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    for options in ([], ["--overwrite"]):
        status, _, stderr = _cli(capsys, "visionzip", stock, link, *options, "--no-progress")
        assert status == 1 and "symbolic link" in stderr
    assert (target / "mine.txt").read_text() == "keep" and link.is_symlink()


# Ctrl-C ----------------------------------------------------------------------------------------------


def _interrupt_on_call(monkeypatch, target, name, calls):
    """Replace `target.name` by a version that raises KeyboardInterrupt on the given call numbers (1-based)."""
    original = getattr(target, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] in calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


def test_interrupt_between_the_two_renames_puts_the_old_output_back(stock, previous_output, tmp_path, monkeypatch,
                                                                    capsys):
    out = shutil.copytree(previous_output, tmp_path / "out")
    before = (out / "config.json").read_text()
    _interrupt_on_call(monkeypatch, output_place.os, "rename", {2})
    status, _, stderr = _cli(capsys, "visionzip", stock, out, "--overwrite", "--no-progress")
    assert status == 130 and "left as it was" in stderr and "nothing was written" in stderr
    assert (out / "config.json").read_text() == before
    assert not _hidden(tmp_path)


def test_ctrl_c_during_the_renames_is_held_back_until_out_is_complete(stock, previous_output, tmp_path, monkeypatch,
                                                                      capsys):
    """A real SIGINT while OUT is renamed aside arrives only after the new OUT is in place."""
    out = shutil.copytree(previous_output, tmp_path / "out")
    original = os.rename
    sent = []

    def rename_with_signal(source, destination):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return original(source, destination)

    monkeypatch.setattr(output_place.os, "rename", rename_with_signal)
    status, _, stderr = _cli(capsys, "visionzip", stock, out, "--overwrite", "--no-progress")
    assert status == 130 and "was written and verified" in stderr and "nothing was written" not in stderr
    assert '"dominant_tokens": 54' in (out / "config.json").read_text()
    assert not _hidden(tmp_path)


def test_interrupt_while_deleting_the_old_output(stock, previous_output, tmp_path, monkeypatch, capsys):
    out = shutil.copytree(previous_output, tmp_path / "out")
    _interrupt_on_call(monkeypatch, output_place.shutil, "rmtree", {1})  # the cleanup's retry succeeds
    status, _, stderr = _cli(capsys, "visionzip", stock, out, "--overwrite", "--no-progress")
    assert status == 130 and "was written and verified" in stderr and "delete by hand" not in stderr
    assert (out / "config.json").is_file() and not _hidden(tmp_path)


def test_leftovers_that_cannot_be_removed_are_named(stock, previous_output, tmp_path, monkeypatch, capsys):
    out = shutil.copytree(previous_output, tmp_path / "out")
    _interrupt_on_call(monkeypatch, output_place.shutil, "rmtree", set(range(1, 10)))  # every deletion interrupted
    status, _, stderr = _cli(capsys, "visionzip", stock, out, "--overwrite", "--no-progress")
    left = _hidden(tmp_path)
    assert status == 130 and "was written and verified" in stderr
    assert len(left) == 1 and ".out.replaced-" in left[0] and left[0] in stderr


def test_interrupt_while_writing_names_an_unremovable_staging_directory(stock, tmp_path, monkeypatch, capsys):
    import llava_token_reduction.conversion.write as conversion_write

    _interrupt_on_call(monkeypatch, conversion_write, "_write_model_card", {1})
    _interrupt_on_call(monkeypatch, output_place.shutil, "rmtree", set(range(1, 10)))
    out = tmp_path / "out"
    status, _, stderr = _cli(capsys, "visionzip", stock, out, "--no-progress")
    left = _hidden(tmp_path)
    assert status == 130 and f"nothing was written to {out}" in stderr
    assert not out.exists() and len(left) == 1 and ".out.partial-" in left[0] and left[0] in stderr
