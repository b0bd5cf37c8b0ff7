# Every target uses the environment at .venv (a link into a cache keyed by the dependency spec; see scripts/setup.sh).
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test demo bench clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests

demo: setup
	$(PY) -m guard_fast.cli pipeline --config configs/demo.toml

bench: setup
	$(PY) -m guard_fast.cli bench --config configs/bench-cpu.toml

clean:
	rm -rf runs/ data/digits .pytest_cache
