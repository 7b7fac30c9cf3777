# The README's two commands. Both set up the environment first (idempotent, see scripts/setup.sh).
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

demo: setup        ## the main job: the whole loop on the shipped corpus and weights
	.venv/bin/kdops --project examples/sentiment/kdops.toml demo --json out/demo.json --report out/demo.html

test: setup        ## the whole suite, real servers included (what CI runs)
	$(PY) -m pytest -q --durations=15

test-fast: setup   ## unit tests only: no real servers, no real weights
	$(PY) -m pytest -q -m "not slow and not server"

bench: setup
	$(PY) bench/quality.py --out out/quality.json
