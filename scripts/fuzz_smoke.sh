#!/usr/bin/env bash
# Run each cargo-fuzz target of rust/fuzz for a few seconds (FUZZ_SECONDS, default 3) over its seed
# corpus (rust/fuzz/seeds/, made from the test fixtures by rust/fuzz/make_seeds.py) plus whatever earlier
# runs found (rust/fuzz/corpus/, not committed). Part of `make test`, on every machine:
# - cargo-fuzz comes from crates.io (pinned below) the first time, into ~/.cargo/bin;
# - libFuzzer's flags (-Z sanitizer=address, sancov) are nightly-only: the build runs on the machine's
#   one (stable) toolchain with RUSTC_BOOTSTRAP=1, which lets it accept them.
# Any crash, panic, leak, timeout or out-of-memory fails the script; libFuzzer saves the input under
# rust/fuzz/artifacts/<target>/ and the script prints its path and the log's tail.
#   FUZZ_SECONDS=300 scripts/fuzz_smoke.sh            # a longer run
#   FUZZ_SECONDS=60 scripts/fuzz_smoke.sh pickle      # one target
#   FUZZ_SMOKE=0 make test                            # opt out, says so
set -euo pipefail

cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-3}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors_header torch_zip pickle)
CARGO_FUZZ_VERSION=0.13.2

if [ "${FUZZ_SMOKE:-1}" = 0 ]; then
    echo "fuzz-smoke skipped: FUZZ_SMOKE=0"
    exit 0
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io (once)"
    cargo install --quiet --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
export RUSTC_BOOTSTRAP=1
fuzz() {
    local command=$1
    shift
    cargo fuzz "$command" --fuzz-dir rust/fuzz --debug-assertions "$@"
}

mkdir -p rust/fuzz/artifacts
if ! fuzz build >rust/fuzz/artifacts/build.log 2>&1; then
    echo "fuzz-smoke: FAILED to build the fuzz targets (log: rust/fuzz/artifacts/build.log)"
    tail -40 rust/fuzz/artifacts/build.log
    exit 1
fi
status=0
for target in "${targets[@]}"; do
    mkdir -p "rust/fuzz/corpus/$target"
    log="rust/fuzz/artifacts/$target.log"
    started="rust/fuzz/artifacts/.$target.started"
    touch "$started"
    if fuzz run "$target" "rust/fuzz/corpus/$target" "rust/fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo '?')
        echo "fuzz-smoke $target: ${seconds}s, $runs executions, no crash"
    else
        echo "fuzz-smoke $target: FAILED (log: $log)"
        tail -40 "$log"
        find "rust/fuzz/artifacts/$target" -type f -newer "$started" -printf "fuzz-smoke $target: input saved: %p\n" 2>/dev/null || true
        status=1
    fi
done
exit $status
