# Every target uses the environment at .venv (a link into a cache keyed by the dependency spec; see scripts/setup.sh).
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-fast demo bench gpu-check clean

setup:
	@bash scripts/setup.sh

# Everything, what CI runs (.ci/run): < 20 min on 2 cores.
test: setup
	$(PY) -m pytest tests

# The in-process lane: no subprocess, no multi-rank, no slow test (< 2 min on 2 cores); tests/conftest.py fails a
# test that launches Python without its `subprocess` marker, so this lane stays what it says.
test-fast: setup
	$(PY) -m pytest tests -m "not subprocess and not multirank and not slow"

# GUARD vs SRe2L end to end on the bundled digits (configs/digits/demo.toml); writes only under data/ and runs/
# (runs/demo/report.md, its chart and image grids). Cached: a rerun skips finished stages.
demo: setup
	$(PY) -m launchers.cli data prepare-digits --out data/digits
	$(PY) -m launchers.cli pipeline --config configs/digits/demo.toml

bench: setup
	$(PY) -m launchers.cli bench --config configs/bench/cpu.toml

# The CUDA path in one prepared run (< 8 min on one H100, no network): compiled Triton kernel tests, a 1-GPU bf16
# DeepSpeed squeeze with torch.compile through FFCV, configs/bench/gpu.toml -> bench/results/gpu-*. Needs the
# environment of `make setup` (not run here: the GPU machine may have no network). No CUDA: one line, exit 0.
gpu-check:
	@bash scripts/gpu_check.sh

clean:
	rm -rf runs/ data/digits .pytest_cache
