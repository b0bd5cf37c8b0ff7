# Every target uses the environment at .venv (a link into a cache keyed by the dependency spec; see scripts/setup.sh).
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test demo bench clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests

# GUARD vs SRe2L end to end on the bundled digits (configs/demo.toml); writes runs/demo/report.md and refreshes
# the README's demo block. Cached: a rerun skips finished stages.
demo: setup
	$(PY) -m launchers.cli data prepare-digits --out data/digits
	$(PY) -m launchers.cli pipeline --config configs/demo.toml
	$(PY) -m bench.demo_readme --run runs/demo

bench: setup
	$(PY) -m launchers.cli bench --config configs/bench-cpu.toml

clean:
	rm -rf runs/ data/digits .pytest_cache
