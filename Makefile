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

.PHONY: all venv develop test test-rust test-python test-dcp lint fmt demo bench clean fuzz-smoke test-peft

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

# PEFT's own save/load tests against `fastadapter.patch()` (issue 13), PEFT as the oracle. The pinned peft's
# sdist ships its tests/; they run in a side environment (.cache/peft-tests-venv) that sees .venv's packages
# and adds what those tests import (tests/peft_suite/requirements.txt, pinned), once plainly and once with
# the patch applied by tests/peft_suite/fastadapter_patch_plugin.py, which also compares every routed save
# with a shadow save by PEFT's original. tests/peft_suite/run.py fails unless every test that passes plainly
# passes patched and LoRA saves and loads were routed; it prints both counts and routed/fallback counts.
# Selected (~1,320 tests after the Hub-needing ones listed in tests/peft_suite/deselect.txt; a pass is ~40 s
# of collection plus a few minutes on 2 cores): from test_custom_models.py, test_save_pretrained* for every
# method and model (save + from_pretrained: the routed paths), and for LoRA only the .bin, adapter-name,
# load_adapter, low_cpu_mem_usage, config= and injection round trips (other methods only fall back there);
# the requires_grad-after-loading tests; test_initialization.py's loading, hotswap, conversion (PiSSA/OLoRA/
# CorDA: fallbacks) and naming tests; test_other.py's and test_config.py's save/load tests. Not selected:
# test_adapter_dtype_autocast (needs the Hub), FSDP round trips (process groups), and the ~19,000 tests that
# neither save nor load.
PEFT_VERSION := $(shell sed -n 's/^peft==//p' requirements-dev.txt)
PEFT_SOURCE := .cache/peft-$(PEFT_VERSION)
PEFT_VENV := .cache/peft-tests-venv
PEFT_FILES := tests/test_custom_models.py tests/test_initialization.py tests/test_other.py tests/test_config.py
PEFT_SELECT := (test_custom_models and TestPeftCustomModel and ((test_save_pretrained and not pickle and not substring) \
	or ((pickle or substring or test_load_multiple_adapters or test_load_model_low_cpu_mem_usage \
	or test_from_pretrained_config_construction or test_parameters_after_loading_model \
	or test_save_load_roundtrip_direct_injection) and LoraConfig) or test_loading_model)) \
	or (test_initialization and (TestHotSwapping or TestLowCpuMemUsage or TestNamingConflictWarning \
	or missing_keys or conversion or load or save)) \
	or (test_other and (save or load or pretrained)) or (test_config and (save or pretrained))

$(PEFT_SOURCE)/tests/__init__.py:
	mkdir -p .cache/sdists
	$(PY) -m pip download --quiet --no-deps --no-binary :all: peft==$(PEFT_VERSION) -d .cache/sdists
	tar -xzf .cache/sdists/peft-$(PEFT_VERSION).tar.gz -C .cache
	touch $@  # the sdist's tests/ is not a package, yet its modules import each other relatively

$(PEFT_VENV)/.installed: tests/peft_suite/requirements.txt | $(DEPS_STAMP)
	$(PYTHON_BIN) -m venv $(PEFT_VENV)
	echo "import site; site.addsitedir('$(abspath $(VENV))/lib/python3.11/site-packages')" > \
		"$$($(PEFT_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/fastadapter-main-venv.pth"
	$(PEFT_VENV)/bin/pip install --quiet -r tests/peft_suite/requirements.txt
	touch $@

test-peft: develop $(PEFT_SOURCE)/tests/__init__.py $(PEFT_VENV)/.installed
	$(PY) tests/peft_suite/run.py $(PEFT_VENV)/bin/python $(PEFT_SOURCE) .cache/peft-suite-results -- \
		$(PEFT_FILES) -k "$(PEFT_SELECT)"

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
