#!/usr/bin/env bash
# Runs integration tests inside a nested KVM host: the Debian cloud kernel as an L1 under QEMU's
# software emulation (TCG) with AMD SVM, where kvm_amd gives a /dev/kvm that runs guest kernels
# for real. Needed where the machine's own KVM cannot (PVM; docs/testing.md).
#
# usage: tests/nested.sh [TEST[:FILTER]]...
#   TEST    an integration test of the tests crate (tests/tests/TEST.rs); FILTER selects test
#           functions by name as cargo test does. Default: the Linux tests and the test-guest suite.
# It builds what is missing (images, release vmm, test binaries), packs them into an ext4 disk at
# the workspace's own path, boots one nested host for all the tests named, streams their output,
# and exits 0 when every test passed, 1 when one failed or the host could not run them, 2 for bad
# arguments. Needs qemu-system-x86, e2fsprogs, python3 (tests/run.sh installs them) and ~6 GiB.
# Environment:
#   NESTED_MEM=6G             memory of the nested host
#   NESTED_TEST_TIMEOUT=1200  bound in seconds for each test binary inside the host
#   NESTED_SILENCE=1500       seconds without a console line before the host is declared stuck
#   NESTED_APPEND=...         more kernel parameters for the host (kvm_amd.PARAM=VALUE, say)
#   NESTED_QEMU=PATH          the qemu-system-x86_64 to use (default: the one on PATH)
#   NESTED_QEMU_DATA=DIR      its firmware directory, searched before the default one (-L)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$root"

die() {
    echo "nested.sh: $1" >&2
    exit "${2:-1}"
}
usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

default_tests=(linux_boot linux_guest testguest_boot virtio_blk snapshot_resume dirty_log)
specs=()
for arg in "$@"; do
    case "$arg" in
        -h | --help)
            usage
            exit 0
            ;;
        -*) die "unknown option $arg (try --help)" 2 ;;
        :* | *[[:space:]]*) die "bad test '$arg': expected TEST or TEST:FILTER, without spaces" 2 ;;
        *) specs+=("$arg") ;;
    esac
done
((${#specs[@]})) || specs=("${default_tests[@]}")

mem=${NESTED_MEM:-6G}
test_timeout=${NESTED_TEST_TIMEOUT:-1200}
silence=${NESTED_SILENCE:-1500}
[[ $test_timeout =~ ^[1-9][0-9]*$ && $silence =~ ^[1-9][0-9]*$ ]] ||
    die "NESTED_TEST_TIMEOUT and NESTED_SILENCE must be whole seconds, at least 1" 2
[[ $mem =~ ^[1-9][0-9]*[MG]$ ]] || die "NESTED_MEM must look like 6G or 4096M, not '$mem'" 2
[[ $root != *[[:space:],]* ]] || die "the workspace path must not contain spaces or commas: $root" 2

qemu=${NESTED_QEMU:-qemu-system-x86_64}
command -v "$qemu" >/dev/null ||
    die "$qemu not found: install it with 'apt-get install qemu-system-x86'"
qemu_data=()
[[ -z ${NESTED_QEMU_DATA:-} ]] || qemu_data=(-L "$NESTED_QEMU_DATA" -L default)
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found: install it with 'apt-get install e2fsprogs'"
command -v python3 >/dev/null || die "python3 not found: install it with 'apt-get install python3'"

# One run at a time: they share target/nested.
mkdir -p target
exec {lock}>target/nested.lock
flock -n "$lock" || die "another tests/nested.sh is running in this workspace"

# What runs inside, built first (all idempotent; build errors are shown as they are).
images/build.sh >&2
cargo build --release -p vmm >&2
manifest=$(mktemp)
trap 'rm -f "$manifest"' EXIT
cargo test --release -p tests --no-run --message-format=json-render-diagnostics >"$manifest" ||
    die "building the test binaries failed (above)"
declare -A exe=()
while IFS=$'\t' read -r name path; do
    exe[$name]=$path
done < <(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"] + "\t" + m["executable"])
' "$manifest")
((${#exe[@]})) || die "cargo test --no-run produced no test binaries"
for spec in "${specs[@]}"; do
    [[ -n ${exe[${spec%%:*}]:-} ]] ||
        die "unknown test '${spec%%:*}'; tests: $(printf '%s\n' "${!exe[@]}" | sort | tr '\n' ' ')" 2
done
release_dir=$(dirname "$(dirname "${exe[${specs[0]%%:*}]}")")
[[ $release_dir == "$root/"* ]] || die "the target directory must be inside the workspace ($release_dir)"

work=$root/target/nested
rm -rf "$work"
mkdir -p "$work/tree/.nested/lib" "$work/tree/tests"
job=$work/tree/.nested/job
: >"$job"
for spec in "${specs[@]}"; do
    name=${spec%%:*}
    filter=
    [[ $spec == *:* ]] && filter=${spec#*:}
    # The Linux tests are #[ignore]d where the machine's KVM cannot run them: run them all here.
    echo "$name $test_timeout ${exe[$name]} --include-ignored --test-threads=1 $filter" >>"$job"
done
cp tests/nested/in-host.sh "$work/tree/.nested/"

# The workspace disk: the files the tests use, at their paths relative to the workspace root.
stage() {
    local rel
    for rel in "$@"; do
        rel=${rel#"$root/"}
        mkdir -p "$work/tree/$(dirname "$rel")"
        cp -l "$rel" "$work/tree/$rel" 2>/dev/null || cp "$rel" "$work/tree/$rel"
    done
}
stage "$release_dir/vmm" images/out/testguest.elf images/out/linux/{bzImage,vmlinux,initramfs.cpio.gz,version}
stage "${exe[@]}"
# Their shared libraries (the host's root has only what its own tools need): LD_LIBRARY_PATH.
for bin in "$release_dir/vmm" "${exe[@]}"; do
    ldd "$bin" | grep -o '/[^ ]*\.so[^ ]*' || true
done | sort -u | while read -r lib; do
    cp -L "$lib" "$work/tree/.nested/lib/"
done
size_mib=$(($(du -sm "$work/tree" | cut -f1) * 5 / 4 + 64))
mkfs.ext4 -q -F -L vmm-workspace -d "$work/tree" "$work/workspace.img" "${size_mib}M" ||
    die "mkfs.ext4 could not make the workspace disk"

# TCG's SVM is not a perfect CPU: now and then a guest hangs or triple-faults there, or L1 itself
# dies (docs/testing.md: what was seen, and what did not help). Shadow paging (NESTED_NPT=0)
# avoided the hangs of back-to-back boots but soft-locked L1 under a memory-heavy guest; one TCG
# thread (NESTED_TCG_THREAD=single) did not help. Nested paging on multi-threaded TCG it is.
token=$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
append="console=ttyS0 panic=-1 quiet loglevel=4 kvm_amd.npt=${NESTED_NPT:-1} nested.token=$token nested.root=$root ${NESTED_APPEND:-}"
log=$work/console.log
: >"$log"
echo "nested.sh: booting the nested host (QEMU TCG, SVM, $mem) for: ${specs[*]}" >&2
exec {console}< <(
    exec "$qemu" "${qemu_data[@]}" -accel "tcg,thread=${NESTED_TCG_THREAD:-multi}" -cpu EPYC-v1,+svm,+npt -smp 2 -m "$mem" \
        -M pc -nodefaults -display none -no-reboot -serial stdio -monitor none \
        -kernel images/out/linux/bzImage -initrd images/out/linux/nested-host.cpio.gz -append "$append" \
        -drive "file=$work/workspace.img,format=raw,if=virtio,readonly=on" </dev/null 2>&1
)
qemu_pid=$!
trap 'kill -9 "$qemu_pid" 2>/dev/null || true; rm -f "$manifest"' EXIT
# A TERM (timeout) or INT ends the run through the EXIT trap, so QEMU never outlives it.
trap 'echo "nested.sh: stopped by a signal" >&2; exit 1' TERM INT

# A failure outside any test still ends with a line tests/run.sh counts.
failed_run() {
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out (nested host: $1)"
    die "$1"
}

status=
started=$(date +%s)
last_line=$started
while true; do
    rc=0
    IFS= read -r -t 60 line <&"$console" || rc=$?
    if ((rc > 128)); then
        # Kernel log lines do not count as signs of life: a wedged host may go on logging.
        if (($(date +%s) - last_line >= silence)); then
            echo "nested.sh: no output from the tests for ${silence}s: the nested host is stuck; its last lines:" >&2
            tail -n 30 "$log" | sed 's/^/nested.sh: | /' >&2 || true
            break
        fi
        continue
    fi
    ((rc == 0)) || break
    line=${line%$'\r'}
    printf '%s\n' "$line" >>"$log"
    [[ $line =~ ^\[\ *[0-9]+\.[0-9]+\] ]] || last_line=$(date +%s)
    # TCG lists the EPYC features it lacks (nrip-save, xsavec, ...); kvm_amd needs none of them.
    [[ $line == *"TCG doesn't support requested feature"* && $line != *svm* && $line != *npt* ]] && continue
    printf '%s\n' "$line"
    if [[ $line =~ ^nested-host:\ done\ $token\ status=([0-9a-z]+)$ ]]; then
        status=${BASH_REMATCH[1]}
        break
    fi
done
# QEMU ends by itself once the host powers off; it is killed if it lingers.
for _ in $(seq 50); do
    kill -0 "$qemu_pid" 2>/dev/null || break
    sleep 0.2
done
kill -9 "$qemu_pid" 2>/dev/null || true
elapsed=$(($(date +%s) - started))

if [[ -z $status ]]; then
    crash=$(grep -m1 -E 'Kernel panic|BUG:' "$log" || true)
    [[ -z $crash ]] || failed_run "the nested host's kernel crashed after ${elapsed}s: $crash"
    qemu_error=$(grep 'qemu-system-x86_64:' "$log" | grep -v "doesn't support requested feature" | head -n 1 || true)
    [[ -z $qemu_error ]] || failed_run "QEMU failed: $qemu_error"
    failed_run "the nested host ended without finishing after ${elapsed}s (console: ${log#"$root/"})"
fi
if [[ $status == setup ]]; then
    failed_run "the nested host could not run tests: $(grep -m1 'nested-host: error' "$log" || echo 'see above')"
fi
if ((status != 0)); then
    echo "nested.sh: $status test binaries had failing tests (nested host done in ${elapsed}s)" >&2
    exit 1
fi
echo "nested.sh: nested host done in ${elapsed}s, every test passed" >&2
