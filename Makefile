# README's two commands: `make demo` (serve the built-in model and explain the example photos) and
# `make test` (lint, type-check, test). Both create .venv when missing and reuse it afterwards.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch pair the install is tested with; override for another CUDA/CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
OUT ?= out
PROTO := protos/camserve/v1/explain.proto

.PHONY: install demo test lint typecheck pytest protos system-deps node-deps bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC) -e '.[server,dev]'
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py --out $(OUT) examples/chelsea.jpg examples/coffee.jpg

# Tools the tests drive (nginx, docker-compose, Node.js, chromium, chromium-driver); installed
# from Debian when missing.
system-deps:
	@bash .ci/system-deps

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

# The Node.js client test's npm packages (tests/node), installed from its lock file when it changed.
node-deps: system-deps
	@cd tests/node && { [ node_modules/.package-lock.json -nt package-lock.json ] || \
		npm ci --no-audit --no-fund --loglevel=error; }

pytest: install system-deps node-deps
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is broken" >&2; exit 1; fi; \
	exit $$rc

test: lint typecheck pytest

# Regenerate the committed gRPC stubs after editing the .proto file.
protos: install
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --grpc_python_out=protos \
		--pyi_out=protos $(PROTO)

bench: install
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/ceiling.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache tests/node/node_modules
