#!/usr/bin/env bash
# Runs every test of the project on this machine: installs missing host packages, builds the
# guest images and the release vmm, then runs the whole workspace's tests (unit and integration,
# with real KVM). Works from a fresh clone. Ends with one line: "N passed, N failed".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
images/install-host-packages.sh
images/build.sh
cargo build --release -p vmm
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace 2>&1 | tee "$log" || status=$?
# cargo prints one summary per test binary (the last is often an empty doc-test run): add them up.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
