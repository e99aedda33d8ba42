# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of PyTorch; installed first so no dependency can pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,onnx,nnunet,text]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/medalloy demo --out $(DEMO_OUT) --overwrite

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
