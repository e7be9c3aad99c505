"""`progress.transformers_bars`: transformers' bars follow a command's `--no-progress`, and a caller's own
setting is put back afterwards."""

import argparse

import pytest
from transformers.utils import logging as transformers_logging

from llava_token_reduction.progress import bars_wanted, transformers_bars


@pytest.fixture
def restore_bars():
    were = transformers_logging.is_progress_bar_enabled()
    yield
    (transformers_logging.enable_progress_bar if were else transformers_logging.disable_progress_bar)()


def test_bars_off_inside_the_block_and_back_on_after_even_on_error(restore_bars):
    transformers_logging.enable_progress_bar()
    with transformers_bars(False):
        assert not transformers_logging.is_progress_bar_enabled()
    assert transformers_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError), transformers_bars(False):
        raise RuntimeError("the command failed")
    assert transformers_logging.is_progress_bar_enabled()


def test_a_caller_s_disabled_bars_stay_disabled(restore_bars):
    transformers_logging.disable_progress_bar()
    with transformers_bars(True):
        assert not transformers_logging.is_progress_bar_enabled()
    assert not transformers_logging.is_progress_bar_enabled()


@pytest.mark.parametrize(("namespace", "wanted"), [
    ({}, True), ({"no_progress": False}, True), ({"no_progress": True}, False),  # most commands
    ({"progress": True}, True), ({"progress": False}, False),  # convert (--no-progress stores progress=False)
])
def test_both_spellings_of_no_progress_are_read(namespace, wanted):
    assert bars_wanted(argparse.Namespace(**namespace)) is wanted
