# `make test`, `make test-browser` and `make demo` each set up their own environment on a fresh machine, then run.
# VENV=PATH uses an environment that already has the project's packages as it is (nothing is installed into it
# but what test-browser lacks); run from a checkout, with PYTHONPATH=$PWD when that environment holds another one.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
SETUP := $(if $(filter .venv,$(VENV)),$(VENV)/.installed)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test test-browser demo app lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: $(SETUP)
	$(PY) -m pytest -q

# The web page in headless Chromium: Debian's chromium and chromedriver (no browser download), Gradio and selenium.
test-browser: $(SETUP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; }
	$(PY) -c "import gradio, selenium" 2>/dev/null || $(PY) -m pip install -q -e ".[test,app,browser]"
	DCRIS_TEST_ARTIFACTS=$(CURDIR)/runs/test-browser $(PY) -m pytest -q -m browser
	@echo "screenshot of the page: $(CURDIR)/runs/test-browser/app.png"

demo: $(SETUP)
	$(VENV)/bin/dcris demo --out runs/demo

# The web page over the demo's model: run `make demo` first, then open http://127.0.0.1:7860
app: $(SETUP)
	$(PY) -c "import gradio" 2>/dev/null || $(PY) -m pip install -q -e ".[app]"
	$(VENV)/bin/dcris app --weights runs/demo/run/export

lint: $(SETUP)
	$(VENV)/bin/ruff check .
