# The two quick-start commands: `make bench` (set up, then compare vlfast with eager PyTorch on this
# machine's device) and `make test` (set up, then run the tests). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# setup.py's requirements and its extras triton, bench (tqdm, nvidia-ml-py) and test, installed by hand:
# the editable build needs torch installed first (--no-build-isolation).
DEPS := "$(TORCH)" "triton>=3.6" numpy tqdm nvidia-ml-py pillow matplotlib pytest diffusers expecttest
# Every csrc/ file that can change the extension, headers at any depth included.
CSRC := $(shell find csrc -type f \( -name '*.c' -o -name '*.cc' -o -name '*.cpp' -o -name '*.cxx' -o -name '*.cu' \
          -o -name '*.h' -o -name '*.hh' -o -name '*.hpp' -o -name '*.cuh' -o -name '*.inl' \) 2>/dev/null)

.PHONY: setup bench test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml $(CSRC)
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
