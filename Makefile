# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint unit venv bench demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check p2pmsg tests scripts
	$(BIN)/ruff format --check p2pmsg tests scripts
	$(BIN)/mypy --strict p2pmsg

test: lint
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Benchmarks print their figures next to the peer they are compared with; docs/benchmarks.md records them.
bench: $(STAMP)
	$(BIN)/python scripts/bench_handshake.py
	$(BIN)/python scripts/bench_messaging.py
	$(BIN)/python scripts/bench_chat_pipe.py
	$(BIN)/python scripts/bench_dht.py
	$(BIN)/python scripts/bench_store.py
	$(BIN)/python scripts/bench_instructions.py --baseline HEAD~1

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
