# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when it
# is missing and install into it the tested package set of constraints.txt; the stamp file
# makes a second run quick. `make lock` resolves pyproject.toml's ranges anew into that file.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.noisyseg-installed
LOCK := constraints.txt
PIP_LOCKED := $(BIN)/python -m pip install --quiet -c $(LOCK)

.PHONY: demo test test-timm install bench browser lint lock lock-timm proto gpu-check kernels-compile kernels-compile-triton36 kernels-test-triton36 wheel-check clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU wheel first, so nothing below pulls CUDA builds of torch.
	$(PIP_LOCKED) torch
	$(PIP_LOCKED) -e '.[dev,serve,clients]'
	# tensorrt-stubs declares a dependency on tensorrt itself, which cannot install without an
	# NVIDIA driver: install the stubs alone, for mypy.
	$(PIP_LOCKED) --no-deps tensorrt-stubs
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/noisyseg demo --out runs/demo

# PYTEST_ARGS: more pytest options (CI: -m 'not timm', since test-timm runs those).
# TEST_WORKERS processes (pytest-xdist), one per core by default; --dist loadfile keeps a test
# file in one worker, so a module's expensive fixture (the demo, the export) is built once.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The timm backbones (`deeplabv3plus_timm`) in a second locked environment, .venv-timm: timm needs
# torchvision, and PyPI's torchvision wheels are CUDA builds that import only beside the matching
# CUDA build of torch (torch 2.14.1 with torchvision 0.29.1 runs on the CPU as well). About 6 GB
# and a few minutes to install; NOISYSEG_REQUIRE_TIMM makes a timm that does not import an error,
# so none of these tests skips. The main environment keeps constraints.txt's CPU torch.
TIMM_VENV := .venv-timm
TIMM_LOCK := constraints-timm.txt
TIMM_STAMP := $(TIMM_VENV)/.noisyseg-installed
TIMM_TORCH := torch==2.14.1 torchvision==0.29.1
TIMM_TOOLS := 'tritonclient[http]' pytest pytest-timeout
$(TIMM_STAMP): pyproject.toml $(TIMM_LOCK)
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install --quiet -c $(TIMM_LOCK) torch torchvision
	$(TIMM_VENV)/bin/python -m pip install --quiet -c $(TIMM_LOCK) -e '.[serve,timm]' $(TIMM_TOOLS)
	touch $(TIMM_STAMP)

test-timm: $(TIMM_STAMP)
	NOISYSEG_REQUIRE_TIMM=1 $(TIMM_VENV)/bin/python -m pytest tests/test_models_timm.py -q

bench: $(STAMP)
	$(PIP_LOCKED) -e '.[bench]'
	$(BIN)/python -m pytest benchmarks --benchmark-only

# The review page's test opens it in Debian's Chromium (Playwright drives it; it downloads no
# browser of its own); without one the test skips and says so. CI installs it (as root).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "make browser: Debian's chromium could not be installed; the review page's browser test will skip"

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# A fresh venv resolves pyproject.toml's ranges (torch pinned to the CPU wheel) and its
# `pip freeze` becomes constraints.txt; run `make test` on it before committing the file.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet torch==2.13.0
	.lock-venv/bin/python -m pip install --quiet '.[dev,serve,clients,bench]'
	.lock-venv/bin/python -m pip install --quiet --no-deps tensorrt-stubs
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/python -m pip freeze --exclude noisyseg | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv build

# noisyseg as a library user gets it: a wheel built from this tree installs into a fresh virtual
# environment (the CPU torch first, then the locked versions), and `noisyseg demo --quick` runs
# there from an empty folder, so nothing of the checkout is used. 15 minutes on the shared 2-core
# machine under load, most of it installing (docs/benchmarks.md); CI runs it.
WHEEL_CHECK := .wheel-check
wheel-check: $(STAMP)
	rm -rf $(WHEEL_CHECK) build && mkdir -p $(WHEEL_CHECK)/empty
	$(BIN)/python -m build --wheel --outdir $(WHEEL_CHECK)/dist .
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/python -m pip install --quiet -c $(LOCK) torch
	$(WHEEL_CHECK)/venv/bin/python -m pip install --quiet -c $(LOCK) $(WHEEL_CHECK)/dist/noisyseg-*.whl
	cd $(WHEEL_CHECK)/empty && env -u PYTHONPATH ../venv/bin/noisyseg recipes \
		&& env -u PYTHONPATH ../venv/bin/noisyseg demo --quick --out demo
	rm -rf $(WHEEL_CHECK) build

# The timm environment's lock: torch and torchvision at TIMM_TORCH, every other package at
# constraints.txt's version where it has one (torch's pins aside: the CUDA build needs its own triton).
lock-timm:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	grep -v -E '^(torch|triton)==' $(LOCK) > .lock-venv/base.txt
	.lock-venv/bin/python -m pip install --quiet -c .lock-venv/base.txt $(TIMM_TORCH)
	.lock-venv/bin/python -m pip install --quiet -c .lock-venv/base.txt '.[serve,timm]' $(TIMM_TOOLS)
	{ sed -n '/^#/p' $(TIMM_LOCK); .lock-venv/bin/python -m pip freeze --exclude noisyseg; } > $(TIMM_LOCK).new
	mv $(TIMM_LOCK).new $(TIMM_LOCK)
	rm -rf .lock-venv build

# The gRPC code under serve/proto/ is generated from serve/proto/inference.proto and committed;
# run this after editing the .proto. The virtual path noisyseg/serve/proto makes the generated
# imports absolute (the repository root is the package). The generated code requires
# grpcio >= and protobuf >= the versions grpcio-tools was built with (pyproject's serve extra).
PROTO_OUT := .proto-out
proto: $(STAMP)
	rm -rf $(PROTO_OUT) && mkdir $(PROTO_OUT)
	$(BIN)/python -m grpc_tools.protoc -Inoisyseg/serve/proto=serve/proto --python_out=$(PROTO_OUT) \
		--pyi_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) noisyseg/serve/proto/inference.proto
	cp $(PROTO_OUT)/noisyseg/serve/proto/inference_pb2* serve/proto/
	rm -rf $(PROTO_OUT)

# The GPU path in one go (kernel tests compiled, kernel benchmark with roofline, bf16 training at
# the paper's scale, ONNX export, TensorRT tests), at most 8 minutes: benchmarks/gpu_check.py.
# It runs the system interpreter ($(PYTHON), with its own torch), not .venv, on an install of
# this tree into a temporary target; without CUDA it says so and exits 2.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(or $(OUT),runs/gpu-check)

# Every Triton kernel the package launches, compiled for sm_80 (A100) and sm_90 (H100) without a
# GPU, with registers, spills, shared memory and occupancy read from the compiled kernels
# (kernels/compile_report.py): OUT/report.json and report.md; fails on a compile error or a spill.
kernels-compile: $(STAMP)
	$(BIN)/python -m noisyseg.kernels.compile_report --out $(or $(OUT),runs/kernels-compile)

# The same, and the Triton kernel tests, with Triton 3.6 (the GPU machines' version) in a second
# environment: the CPU torch wheel as above, triton 3.6.0 and pytest, this tree installed
# editable without dependencies (the kernels need only torch and triton). numpy below 2.4: Triton
# 3.6's interpreter turns scalar kernel arguments into one-element arrays and int()s them in
# `range(0, C, BLOCK_C)`, which numpy 2.4 refuses (TypeError); 2.3 still allows it.
TRITON36_VENV ?= .venv-triton36
TRITON36_STAMP := $(TRITON36_VENV)/.noisyseg-installed
$(TRITON36_STAMP): pyproject.toml $(LOCK)
	test -x $(TRITON36_VENV)/bin/python || $(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install --quiet -c $(LOCK) torch
	grep -v '^triton==\|^numpy==' $(LOCK) > $(TRITON36_VENV)/constraints.txt
	$(TRITON36_VENV)/bin/python -m pip install --quiet -c $(TRITON36_VENV)/constraints.txt triton==3.6.0 'numpy<2.4' pytest
	$(TRITON36_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

kernels-compile-triton36: $(TRITON36_STAMP)
	$(TRITON36_VENV)/bin/python -m noisyseg.kernels.compile_report --out $(or $(OUT),runs/kernels-compile-triton36)

kernels-test-triton36: $(TRITON36_STAMP)
	$(TRITON36_VENV)/bin/python -m pytest -q tests/test_kernels_triton.py tests/test_kernels_compile.py

clean:
	rm -rf $(VENV) $(TIMM_VENV) .venv-triton36 runs .pytest_cache .benchmarks $(WHEEL_CHECK) build
