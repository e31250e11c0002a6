#!/usr/bin/env bash
# Run each cargo-fuzz target of rust/fuzz for a few seconds (FUZZ_SECONDS, default 3) over its seed
# corpus plus whatever earlier runs found (rust/fuzz/corpus/, not committed). Part of `make test`.
# Needs a nightly toolchain and cargo-fuzz; without them it says why and succeeds, so a machine without
# them still runs the rest of the suite. Any crash, leak, timeout or out-of-memory fails the script;
# libFuzzer saves the input under rust/fuzz/artifacts/<target>/.
#   FUZZ_SECONDS=300 scripts/fuzz_smoke.sh            # a longer run
#   FUZZ_SECONDS=60 scripts/fuzz_smoke.sh pickle      # one target
set -euo pipefail

cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-3}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(safetensors_header torch_zip pickle)

skip() {
    echo "fuzz-smoke skipped: $1"
    exit 0
}
[ "${FUZZ_SMOKE:-1}" != 0 ] || skip "FUZZ_SMOKE=0"
command -v cargo >/dev/null || skip "no cargo on PATH"
cargo +nightly --version >/dev/null 2>&1 || skip "no nightly toolchain (rustup toolchain install nightly)"
cargo +nightly fuzz --version >/dev/null 2>&1 || skip "cargo-fuzz is not installed (cargo install cargo-fuzz)"

cargo +nightly fuzz build --fuzz-dir rust/fuzz --debug-assertions 2>&1 | grep -v '^ *Compiling' || true
status=0
for target in "${targets[@]}"; do
    mkdir -p "rust/fuzz/corpus/$target"
    log="rust/fuzz/artifacts/$target.log"
    mkdir -p "$(dirname "$log")"
    if cargo +nightly fuzz run --fuzz-dir rust/fuzz --debug-assertions "$target" \
        "rust/fuzz/corpus/$target" "rust/fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo '?')
        echo "fuzz-smoke $target: ${seconds}s, $runs executions, no crash"
    else
        echo "fuzz-smoke $target: FAILED (see $log and rust/fuzz/artifacts/$target/)"
        tail -40 "$log"
        status=1
    fi
done
exit $status
