#!/usr/bin/env bash
# Builds the cargo-fuzz targets of fuzz/ and runs each for FUZZ_SECONDS (default 60) seconds;
# fails on the first crash, leak, timeout or out-of-memory. Works from a fresh clone (CI=true,
# as root): installs nightly and cargo-fuzz if missing. See docs/fuzzing.md.
#
#   FUZZ_SECONDS=300 bash .ci/fuzz.sh              # every target, 5 minutes each
#   FUZZ_TARGETS="frame_decode qmp_input" bash .ci/fuzz.sh
#
# The committed seeds (fuzz/corpus/<target>/) are read only; what a run finds goes to
# fuzz/target/corpus/<target>/ (kept between runs), crashes to fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_TARGETS="${FUZZ_TARGETS:-frame_decode secondary_session virtio_request qmp_input}"
TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"

if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
    rustup toolchain install "$TOOLCHAIN" --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked || cargo install cargo-fuzz
fi

# Release build with debug assertions (and overflow checks), AddressSanitizer (the default).
BUILD=(--debug-assertions)
echo "=== fuzz: building ($(date -u +%H:%M:%S))"
cargo "+$TOOLCHAIN" fuzz build "${BUILD[@]}"

for t in $FUZZ_TARGETS; do
    work="target/corpus/$t"
    mkdir -p "$work" "artifacts/$t"
    echo "=== fuzz: $t for ${FUZZ_SECONDS}s ($(date -u +%H:%M:%S))"
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: the default 2 GiB.
    set +e
    cargo "+$TOOLCHAIN" fuzz run "${BUILD[@]}" "$t" "$work" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 2>&1 | tee "target/fuzz-$t.log" | grep -E --line-buffered \
        '^(INFO: Running|#[0-9]+ *DONE|==[0-9]+==|SUMMARY|stat::number_of_executed_units|stat::peak_rss_mb)|panicked|Crash|Test unit written'
    rc="${PIPESTATUS[0]}"
    set -e
    if [ "$rc" != 0 ]; then
        echo "=== fuzz: $t FAILED; the input is in fuzz/artifacts/$t/ (log: fuzz/target/fuzz-$t.log)"
        tail -n 60 "target/fuzz-$t.log"
        exit 1
    fi
done
echo "=== fuzz: all targets passed ($(date -u +%H:%M:%S))"
