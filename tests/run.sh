#!/usr/bin/env bash
# Runs every test of the project on this machine: installs missing host packages, builds the
# guest images and the release vmm, then runs the whole workspace's tests (unit and integration,
# with real KVM). Works from a fresh clone.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
images/install-host-packages.sh
images/build.sh
cargo build --release -p vmm
cargo test --release --workspace
