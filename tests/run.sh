#!/usr/bin/env bash
# Runs every test of the project on this machine: installs missing host packages, builds the
# guest images and the release vmm, then runs the whole workspace's tests (unit and integration,
# with real KVM). Works from a fresh clone. Ends with one line: "N passed, N failed".
#
# Where KVM has hardware virtualization, everything runs here, the Linux guest tests included.
# Where it has not (PVM), the Linux tests run here only as far as PVM lets a kernel go; then
# tests/nested.sh runs the Linux tests in full, and the test-guest suite again on SVM, inside a
# nested KVM host under QEMU's emulation, whose results are reported but do not decide the
# status: the emulator itself fails a guest now and then (docs/testing.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
images/install-host-packages.sh
images/build.sh
cargo build --release -p vmm
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
if [[ -e /sys/module/kvm_intel || -e /sys/module/kvm_amd ]]; then
    echo "run.sh: hardware KVM: every test runs here"
    cargo test --release --workspace --no-fail-fast -- --include-ignored 2>&1 | tee "$log" || status=$?
else
    echo "run.sh: no hardware virtualization (PVM): the Linux-only tests run in the nested host below"
    cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
    # The nested host (QEMU TCG with SVM) runs the Linux guest tests in full, but its emulator
    # hangs or crashes a guest now and then (docs/testing.md): its results are reported, and do
    # not decide this run's status. On hardware KVM the same tests run above and do.
    nested_log=$(mktemp)
    nested=0
    # Bounded as a whole (10 minutes: linux_boot and the first Linux guest tests when no guest
    # fails), so the whole CI run stays within about 25 minutes; tests/nested.sh runs all.
    NESTED_TEST_TIMEOUT=${NESTED_TEST_TIMEOUT:-600} timeout -k 20 "${NESTED_TOTAL_TIMEOUT:-600}" tests/nested.sh 2>&1 |
        sed -u 's/^test result:/nested test result:/' | tee "$nested_log" || nested=$?
    awk -v status="$nested" '/^nested test result:/ { p += $5; f += $7 }
        END { if (status != 0 && f == 0) f = 1;
              printf "run.sh: nested host (reported, not gating on PVM; docs/testing.md): %d passed, %d failed\n", p, f }' \
        "$nested_log"
    rm -f "$nested_log"
fi
# cargo prints one summary per test binary (the last is often an empty doc-test run): add them up.
# A failure outside any test (a build, the nested host itself) counts as one failed.
awk -v status="$status" '/^test result:/ { p += $4; f += $6 }
    END { if (status != 0 && f == 0) f = 1; printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
