# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when it
# is missing and install into it; the stamp file makes a second run quick.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.noisyseg-installed

.PHONY: demo test install bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU wheel first, so nothing below pulls CUDA builds of torch.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,serve]'
	# tensorrt-stubs declares a dependency on tensorrt itself, which cannot install without an
	# NVIDIA driver: install the stubs alone, for mypy.
	$(BIN)/python -m pip install --quiet --no-deps tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/noisyseg demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks --benchmark-only

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
