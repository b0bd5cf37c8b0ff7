"""scripts/gpu_check.sh (`make gpu-check`) off the GPU: one line and exit 0 without CUDA; a clear error without an env.

The GPU steps themselves are exercised on CPU by `GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh` (minutes, not part
of the suite: it compiles the model with torch.compile); see docs/benchmarks.md.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import PYTHON, REPO, subprocess_env

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(tmp_path, **env_overrides) -> subprocess.CompletedProcess:
    env = subprocess_env()
    env.update({"PY": PYTHON, "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""}, **env_overrides)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.subprocess
def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.subprocess
def test_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    r = _run(tmp_path)  # CUDA_VISIBLE_DEVICES="" hides any GPU, so this also holds on a CUDA machine
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], r.stdout
    assert r.stderr == ""
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


@pytest.mark.subprocess
def test_missing_environment_is_an_error_naming_make_setup(tmp_path):
    r = _run(tmp_path, PY=str(tmp_path / "no-such-python"))
    assert r.returncode == 2
    assert "make setup" in r.stderr and r.stdout == ""


def test_make_target_runs_the_script():
    makefile = (REPO / "Makefile").read_text()
    assert "gpu-check:\n\t@bash scripts/gpu_check.sh" in makefile
