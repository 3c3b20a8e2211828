# Two commands a newcomer needs (see README):  make run   |   make test
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV   ?= .venv
# A CPU wheel is enough for the tests and the quickstart; on a CUDA machine pass e.g. TORCH=torch.
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,tf,eval
PROFILE ?= quickstart
ARGS   ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.groundup-installed

.PHONY: run test install lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/groundup run --profile $(PROFILE) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check groundup tests bench

BENCHES := tokenize train generate load_weights finetune responses pipeline peers

bench: $(STAMP)
	for b in $(BENCHES); do $(BIN)/python -m bench.$$b || exit 1; done

clean:
	rm -rf artifacts .pytest_cache
