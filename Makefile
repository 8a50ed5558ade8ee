# The two quick-start commands: `make bench` (set up, then compare vlfast with eager PyTorch on this
# machine's device) and `make test` (set up, then run the tests). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
DEPS := "$(TORCH)" "triton>=3.6" numpy tqdm nvidia-ml-py pytest diffusers

.PHONY: setup bench test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(DEPS)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $@

bench: setup
	$(BIN)/python -m vlfast bench

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info vlfast/_C*.so
