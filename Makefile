# Two entry points for a fresh machine (see README): `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run resume test test-fast bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

# The main job: example training with checkpointing, embedded default config.
run: install
	$(BIN)/ckptmgr run configs/local.yaml

resume: install
	$(BIN)/ckptmgr resume configs/local.yaml

# The whole test suite (CI runs exactly this through .ci/run).
test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m bench

bench-quick: install
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
