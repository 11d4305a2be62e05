# mmvq developer entry points. Both README commands go through `setup`, which is
# idempotent: the first run on a fresh machine builds mmcv once (~20 min), later
# runs reuse the cached wheel in ~/.cache/mmvq/wheels.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean-venv

setup:
	bash tools/setup_env.sh

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
