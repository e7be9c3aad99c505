"""Shared fixtures: tiny random-weight LLaVA models, saved checkpoints and an isolated-process runner.

Everything is built offline from configs (`llava_token_reduction.tiny`), so nothing here touches the network.
Fixtures that build or save models are session-scoped; treat the objects they return as read-only (build
your own with the `make_*` factories when a test needs to change a config or weights).

Overview
--------
- `tiny_shape`                  the `TinyShape` of every tiny model (56px images, patch 7: 64 patches + CLS).
- `make_llava_config(**kw)`     a fresh stock `LlavaConfig`; `kw` override the tiny defaults.
- `make_visionzip_config(**kw)` a fresh `LlavaVisionZipConfig` (default budget 10+4 here).
- `make_visionzip_model(seed=0, spread=True, **config_kw)`
                                a fresh fp32 eval `LlavaVisionZipForConditionalGeneration`; `spread=True`
                                redraws the vision tower with `spread_vision_weights` (peaked attention).
- `spread_vision_weights(module, seed)`
                                redraws a module's weights with large, seeded values so that CLS attention is
                                far from uniform and top-k / argmax choices have clear margins
                                (`methods_under_test.spread_weights`, also used by its one model builder).
- `make_pixel_values(batch=1, size=None, seed=0)`
                                seeded `[batch, 3, size, size]` fp32 pixels (size defaults to the tiny image).
- `tiny_processor`              a stock `LlavaProcessor` for the tiny shape (64 placeholders per image).
- `stock_llava_model` / `stock_llava_dir`
                                a stock `LlavaForConditionalGeneration` and its saved checkpoint + processor.
- `visionzip_model` / `visionzip_checkpoint_dir`
                                a VisionZip model (10+4, spread weights) and its `save_pretrained` directory
                                (with the processor).
- `saved_methods`               per name of `methods_under_test.METHOD_NAMES`, a `MethodSetup`: the shared tests'
                                model of that method (`build_method`), its processor, its stock twin and its
                                `save_pretrained` directory (with the processor).
- `method_setup`                the same, one method per parametrization (tests that use it run per method).
- `run_isolated_python(script, workdir)`
                                runs a Python script in a fresh process with `HF_HUB_OFFLINE=1`, a private
                                `HF_MODULES_CACHE` and `llava_token_reduction` made unimportable.
"""

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from llava_token_reduction import LlavaVisionZipConfig, LlavaVisionZipForConditionalGeneration
from llava_token_reduction.tiny import TEST_SHAPE, build_processor, llava_config_kwargs
from methods_under_test import METHOD_NAMES, build_method
from methods_under_test import spread_weights as _spread_vision_weights


# Tiny models spend their time in thread hand-offs, not arithmetic: on a busy 2-core machine one intra-op
# thread runs this suite several times faster. Child processes inherit the setting through the environment,
# so results compared bit for bit across processes use the same kernels. An explicit OMP_NUM_THREADS wins.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The budget of the shared VisionZip fixtures: 10 kept (CLS + 9 patches) + 4 merged = 14 tokens per image.
VISIONZIP_TEST_BUDGET = {"dominant_tokens": 10, "contextual_tokens": 4}


@pytest.fixture(scope="session")
def tiny_shape():
    return TEST_SHAPE


@pytest.fixture(scope="session")
def spread_vision_weights():
    return _spread_vision_weights


@pytest.fixture(scope="session")
def make_llava_config():
    def make(**overrides) -> LlavaConfig:
        return LlavaConfig(**{**llava_config_kwargs(), **overrides})

    return make


@pytest.fixture(scope="session")
def make_visionzip_config():
    def make(**overrides) -> LlavaVisionZipConfig:
        return LlavaVisionZipConfig(**{**llava_config_kwargs(), **VISIONZIP_TEST_BUDGET, **overrides})

    return make


@pytest.fixture(scope="session")
def make_visionzip_model(make_visionzip_config):
    def make(seed: int = 0, spread: bool = True, **config_overrides) -> LlavaVisionZipForConditionalGeneration:
        torch.manual_seed(seed)
        model = LlavaVisionZipForConditionalGeneration(make_visionzip_config(**config_overrides))
        if spread:
            _spread_vision_weights(model.model.vision_tower, seed=seed + 1)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def make_pixel_values(tiny_shape):
    def make(batch: int = 1, size: int | None = None, seed: int = 0) -> torch.Tensor:
        size = size or tiny_shape.image_size
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

    return make


@pytest.fixture(scope="session")
def tiny_processor():
    return build_processor()


@pytest.fixture(scope="session")
def stock_llava_model(make_llava_config):
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(make_llava_config())
    _spread_vision_weights(model.model.vision_tower, seed=1)
    return model.eval()


def save_checkpoint(model, processor, directory):
    """Save `model` and `processor` side by side, as a user ships a checkpoint; returns `directory`."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def stock_llava_dir(stock_llava_model, tiny_processor, tmp_path_factory):
    return save_checkpoint(stock_llava_model, tiny_processor, tmp_path_factory.mktemp("stock_llava"))


@pytest.fixture(scope="session")
def visionzip_model(make_visionzip_model):
    return make_visionzip_model(seed=0)


@pytest.fixture(scope="session")
def visionzip_checkpoint_dir(visionzip_model, tiny_processor, tmp_path_factory):
    return save_checkpoint(visionzip_model, tiny_processor, tmp_path_factory.mktemp("visionzip_checkpoint"))


@dataclass(frozen=True)
class MethodSetup:
    """What the shared behaviour tests use of one method (read-only: build your own to change it)."""

    name: str
    model: torch.nn.Module
    processor: object
    stock: LlavaForConditionalGeneration
    directory: object  # the saved checkpoint (model + processor)


@pytest.fixture(scope="session")
def saved_methods(tmp_path_factory):
    setups = {}
    for name in METHOD_NAMES:
        model, processor, stock = build_method(name)
        directory = save_checkpoint(model, processor, tmp_path_factory.mktemp(f"{name}_shared"))
        setups[name] = MethodSetup(name, model, processor, stock, directory)
    return setups


@pytest.fixture(scope="session", params=METHOD_NAMES)
def method_setup(request, saved_methods):
    return saved_methods[request.param]


# What every reduced-LLaVA checkpoint ships besides its method's own files: the LLaVA-1.5 family, what every
# family shares (generation mechanism, compaction, the seam), the shared selection helpers, the checkpoint writer
# and fit checks, the config checks.
SHARED_CODE_FILES = frozenset({
    "config_checks.py", "family_llava.py", "reduced_model.py", "reduced_generation.py", "reduced_inputs.py",
    "token_compaction.py", "vision_inputs.py", "method_base.py", "token_selection.py", "checkpoint_code.py",
    "checkpoint_source.py",
})


def assert_ships_only(checkpoint_dir, method_files: set[str], foreign_texts: tuple[str, ...]) -> None:
    """The `.py` files a `save_pretrained` wrote are exactly `SHARED_CODE_FILES` plus the method's own, and none of
    them holds a text of another method (a function definition, a message)."""
    shipped = {name for name in os.listdir(checkpoint_dir) if name.endswith(".py")}
    assert shipped == SHARED_CODE_FILES | method_files, sorted(shipped ^ (SHARED_CODE_FILES | method_files))
    for name in shipped:
        source = (checkpoint_dir / name).read_text(encoding="utf-8")
        for text in foreign_texts:
            assert text not in source, f"{name} holds {text!r}"


_ISOLATION_PREAMBLE = """\
import sys
sys.modules["llava_token_reduction"] = None  # the package must not be needed to load a checkpoint
"""


@pytest.fixture(scope="session")
def run_isolated_python():
    """`run(script, workdir, timeout=120)`: write `script` (dedented) to `workdir/child.py` behind a preamble
    that blocks `import llava_token_reduction`, run it from `workdir` with `HF_HUB_OFFLINE=1` and
    `HF_MODULES_CACHE=workdir/modules`, and return the `CompletedProcess`. Fails the test (showing the
    child's output) if the exit status is not 0."""

    def run(script: str, workdir, timeout: float = 120) -> subprocess.CompletedProcess:
        workdir = os.fspath(workdir)
        path = os.path.join(workdir, "child.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(_ISOLATION_PREAMBLE + textwrap.dedent(script))
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_MODULES_CACHE": os.path.join(workdir, "modules"),
            "PYTHONPATH": "",
        }
        result = subprocess.run(
            [sys.executable, path], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            pytest.fail(f"isolated child failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    return run
