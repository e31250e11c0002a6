# One entry point for set-up, tests, lint, demo and benchmarks. Every target bootstraps what it needs
# (a virtualenv with pinned dependencies, a release build of the extension), so on a fresh machine with
# Python 3.11, a Rust toolchain and make, `make demo` and `make test` are all there is to run.

PYTHON_BIN ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
# The PyO3 build script (cargo test/clippy/maturin) must see the venv's interpreter.
export PYO3_PYTHON := $(abspath $(PY))
# No model hub, ever: tests and benchmarks build models from configs.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: all venv develop test test-rust test-python test-dcp lint fmt demo bench clean fuzz-smoke

all: test

$(PY):
	$(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(DEPS_STAMP)

# Release build of fastadapter._core into the venv (incremental: cheap when nothing changed).
develop: $(DEPS_STAMP)
	$(VENV)/bin/maturin develop --release --quiet

test-rust:
	cargo test --quiet

test-python: develop
	$(PY) -m pytest -q tests --ignore=tests/dcp

# Multi-process torch.distributed.checkpoint / FSDP2 tests (2 and 4 gloo ranks spawned per test, ~6 min on
# 2 cores): their own target, run by .ci/run after `make test`.
test-dcp: develop
	$(PY) -m pytest -q tests/dcp

# Needs the built extension: stubtest checks python/fastadapter/_core.pyi against the real fastadapter._core.
lint: develop
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check python tests benches scripts
	$(VENV)/bin/ruff format --check python tests benches scripts
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest fastadapter._core --allowlist scripts/stubtest-allowlist.txt

fmt: $(DEPS_STAMP)
	cargo fmt --all
	$(VENV)/bin/ruff format python tests benches scripts
	$(VENV)/bin/ruff check --fix python tests benches scripts

# A few seconds per cargo-fuzz target (rust/fuzz), on the stable toolchain (RUSTC_BOOTSTRAP=1); installs
# cargo-fuzz from crates.io the first time. A crash fails it, the input saved under rust/fuzz/artifacts/.
# Longer: `FUZZ_SECONDS=300 scripts/fuzz_smoke.sh`. Opt out: FUZZ_SMOKE=0.
fuzz-smoke:
	scripts/fuzz_smoke.sh

# The README's test command: bootstrap, Rust tests, lint, Python tests, fuzz smoke. Fails on any failure.
test: develop test-rust lint test-python fuzz-smoke

# The README's main job on a generated Llama + LoRA: save, load, convert (and a hostile .bin), checkpoint;
# each checked against PEFT / torch and timed against it; one summary table, non-zero exit on a failed check.
demo: develop
	$(PY) scripts/demo.py

# Benchmarks against PEFT / safetensors / raw writes, all in one run, then the ratio tables and one chart
# per job (docs/benchmarks/<job>.png), both from the same JSON.
bench: develop
	$(PY) -m pytest benches --benchmark-only --benchmark-json=.benchmarks/latest.json -q
	$(PY) benches/compare.py .benchmarks/latest.json
	cd benches && ../$(PY) charts.py ../.benchmarks/latest.json ../docs/benchmarks

clean:
	cargo clean
	rm -rf $(VENV) .benchmarks .pytest_cache .mypy_cache .ruff_cache
