"""The `config.json` every reduced config writes stays the same file when the config code is reorganised: each
case below is compared byte for byte with the file the code wrote before the configs shared their field
declarations and checks (`tests/fixtures/config_json/`, written by `python tests/test_config_json.py --write`
on that code). Only the `transformers_version` value is normalised, so that a newer transformers release does
not fail the comparison. Each old file also loads back into the config it was written from."""

import re
import sys
from pathlib import Path

import pytest
import transformers

from llava_token_reduction import (
    LlavaNextVisionZipConfig,
    LlavaPruMergeConfig,
    LlavaTrimConfig,
    LlavaVisionZipConfig,
)
from llava_token_reduction.methods import METHODS
from llava_token_reduction.tiny import llava_config_kwargs, trim_config_kwargs
from llava_token_reduction.tiny_next import llava_next_config_kwargs


FIXTURES = Path(__file__).parent / "fixtures" / "config_json"

# name -> (config class, keyword arguments, whether the file is a checkpoint's: written by the model's
# `save_pretrained`, with `architectures`, `auto_map` and `dtype`, rather than by the config's alone).
CASES = {
    "visionzip_default": (LlavaVisionZipConfig, lambda: {}, False),
    "visionzip_tiny": (LlavaVisionZipConfig, lambda: dict(**llava_config_kwargs(), dominant_tokens=10,
                                                          contextual_tokens=4, visionzip_layer=-1), True),
    "next_visionzip_default": (LlavaNextVisionZipConfig, lambda: {}, False),
    "next_visionzip_tiny": (LlavaNextVisionZipConfig, lambda: dict(**llava_next_config_kwargs(), dominant_tokens=6,
                                                                   contextual_tokens=2), True),
    "trim_default": (LlavaTrimConfig, lambda: {}, False),
    "trim_tiny": (LlavaTrimConfig, lambda: dict(**trim_config_kwargs(), trim_min_tokens=2, trim_max_tokens=20,
                                                trim_negate_similarity=False), True),
    "prumerge_default": (LlavaPruMergeConfig, lambda: {}, False),
    "prumerge_tiny": (LlavaPruMergeConfig, lambda: dict(**llava_config_kwargs(), prumerge_plus=True,
                                                        prumerge_max_tokens=8, prumerge_iqr_multiplier=1.0), True),
}

_VERSION = re.compile(r'("transformers_version": )"[^"]*"')


def write_case(name: str, directory: Path) -> Path:
    """Write case `name`'s config.json into `directory` the way users do; returns its path."""
    config_class, kwargs, checkpoint = CASES[name]
    config = config_class(**kwargs())
    if checkpoint:
        import torch

        torch.manual_seed(0)
        transformers.AutoModelForImageTextToText.from_config(config).save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    return directory / "config.json"


def _normalised(text: str) -> str:
    return _VERSION.sub(rf'\1"{transformers.__version__}"', text)


def test_every_method_has_cases():
    assert {config_class for config_class, _, _ in CASES.values()} >= {m.config_class for m in METHODS.values()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_json_is_byte_identical(name, tmp_path):
    written = write_case(name, tmp_path).read_bytes().decode("utf-8")
    before = (FIXTURES / f"{name}.json").read_bytes().decode("utf-8")
    assert _normalised(written) == _normalised(before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_old_config_json_loads_into_the_same_config(name, tmp_path):
    config_class, kwargs, _ = CASES[name]
    (tmp_path / "config.json").write_bytes((FIXTURES / f"{name}.json").read_bytes())
    loaded = config_class.from_pretrained(tmp_path)
    expected = config_class(**kwargs())
    ignored = ("architectures", "auto_map", "dtype", "transformers_version")
    assert {k: v for k, v in loaded.to_dict().items() if k not in ignored} == \
        {k: v for k, v in expected.to_dict().items() if k not in ignored}


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    FIXTURES.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        with tempfile.TemporaryDirectory() as directory:
            (FIXTURES / f"{case}.json").write_bytes(write_case(case, Path(directory)).read_bytes())
        print("wrote", FIXTURES / f"{case}.json")
