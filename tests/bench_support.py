"""What the bench tests of both families share: `bench` run on a hub id from a private hub cache, offline,
in a child process, and the standalone efficiency script loaded as a module."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from conversion_inputs import add_to_hub_cache


ROOT = Path(__file__).resolve().parent.parent


def bench_from_hub_cache(tmp_path, repo_id: str, checkpoint, bench_args: list[str]) -> dict:
    """Put `checkpoint` (a saved directory) into a hub cache as `repo_id`, run `llava-token-reduction bench --model
    repo_id *bench_args` with HF_HUB_OFFLINE=1 on one thread, and return its bench.json."""
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, repo_id, checkpoint)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "llava_token_reduction", "bench", "--model", repo_id, *bench_args, "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr
    return json.loads((out / "bench.json").read_text())


def efficiency_script():
    """benchmarks/visionzip_efficiency.py (a script, not a package module) loaded as a module."""
    path = ROOT / "benchmarks" / "visionzip_efficiency.py"
    spec = importlib.util.spec_from_file_location("visionzip_efficiency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
