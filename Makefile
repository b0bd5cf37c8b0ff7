# Every target uses the environment at .venv (a link into a cache keyed by the dependency spec; see scripts/setup.sh).
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test demo bench clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests

# GUARD vs plain teachers on the bundled digits; refreshes results/squeeze-digits.md and the README table.
demo: setup
	$(PY) -m guard_fast.cli data prepare-digits --out data/digits
	$(PY) -m bench.squeeze_digits --data data/digits

bench: setup
	$(PY) -m guard_fast.cli bench --config configs/bench-cpu.toml

clean:
	rm -rf runs/ data/digits .pytest_cache
