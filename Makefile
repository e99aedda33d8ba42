# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of PyTorch; installed first so no dependency can pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: demo test lint docs install install-dev clean mutation mutation-report

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[train,dev,onnx,nnunet,text,docs]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/medalloy pipeline examples/demo.yaml --out $(DEMO_OUT)

# the house style, as CI and the pre-commit hooks check it (ruff pinned in the dev extra)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install
	$(BIN)/python -m pytest -q --durations=25

# the documentation site (mkdocs.yml) into site/; --strict: a broken link or anchor, or a page missing from the nav, fails
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

# Mutation testing of the method cores (docs/testing.md); not in CI: about 20-30 min on 2 idle cores,
# about 75 min when the cores are shared. Starts afresh, so edits since the last run are seen; src/ and
# tests/ are copied into mutants/ in the first minutes, so later edits do not reach this run.
# Interrupted? `$(BIN)/mutmut run` resumes it; `make mutation-report` prints the table again.
MUTATION_JOBS ?= 2

$(VENV)/.mutation-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[mutation]"
	touch $@

mutation: $(VENV)/.mutation-installed
	rm -rf mutants
	MEDALLOY_TEST_THREADS=1 $(BIN)/mutmut run --max-children $(MUTATION_JOBS)
	$(BIN)/python tools/mutation_report.py > mutants/report.md
	$(BIN)/python tools/mutation_report.py --table-only
	@echo "survivors with their diffs: mutants/report.md"

mutation-report:
	$(BIN)/python tools/mutation_report.py

clean:
	rm -rf $(VENV) runs mutants site
