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
# and exits with their status (0: all passed). Environment:
#   NESTED_MEM=6G             memory of the nested host
#   NESTED_TEST_TIMEOUT=1200  bound in seconds for each test binary inside the host
#   NESTED_SILENCE=1500       seconds without a console line before the host is declared stuck
#                             (tests print when they end, so a quiet minute or two is normal)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

die() {
    echo "nested.sh: $*" >&2
    exit "${2:-1}"
}
usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

default_tests=(linux_boot linux_guest testguest_boot virtio_blk snapshot_resume dirty_log)
specs=()
for arg in "$@"; do
    case "$arg" in
        -h | --help)
            usage
            exit 0
            ;;
        -*) die "unknown option $arg (try --help)" 2 ;;
        *) specs+=("$arg") ;;
    esac
done
((${#specs[@]})) || specs=("${default_tests[@]}")

mem=${NESTED_MEM:-6G}
test_timeout=${NESTED_TEST_TIMEOUT:-1200}
silence=${NESTED_SILENCE:-1500}
[[ $test_timeout =~ ^[0-9]+$ && $silence =~ ^[0-9]+$ ]] ||
    die "NESTED_TEST_TIMEOUT and NESTED_SILENCE must be whole seconds" 2
[[ $root != *[[:space:]]* ]] || die "the workspace path must not contain spaces: $root" 2

command -v qemu-system-x86_64 >/dev/null ||
    die "qemu-system-x86_64 not found: install it with 'apt-get install qemu-system-x86'"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found: install it with 'apt-get install e2fsprogs'"

# What runs inside, built first (all idempotent).
images/build.sh >&2
cargo build --release -p vmm >&2
declare -A exe=()
while IFS=$'\t' read -r name path; do
    exe[$name]=$path
done < <(cargo test --release -p tests --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"] + "\t" + m["executable"])
')
((${#exe[@]})) || die "cargo test --no-run produced no test binaries"

work=$root/target/nested
rm -rf "$work"
mkdir -p "$work/tree/.nested"
job=$work/tree/.nested/job
: >"$job"
for spec in "${specs[@]}"; do
    name=${spec%%:*}
    filter=
    [[ $spec == *:* ]] && filter=${spec#*:}
    [[ -n ${exe[$name]:-} ]] ||
        die "unknown test '$name'; tests: $(printf '%s\n' "${!exe[@]}" | sort | tr '\n' ' ')" 2
    # The Linux tests are #[ignore]d where the machine's KVM cannot run them: run them all here.
    echo "$name $test_timeout ${exe[$name]} --include-ignored --test-threads=1 $filter" >>"$job"
done
cp tests/nested/in-host.sh "$work/tree/.nested/"

# The workspace disk: the files the tests use, at their paths relative to the workspace root.
stage() {
    local rel
    for rel in "$@"; do
        mkdir -p "$work/tree/$(dirname "$rel")"
        cp -l "$rel" "$work/tree/$rel" 2>/dev/null || cp "$rel" "$work/tree/$rel"
    done
}
stage target/release/vmm images/out/testguest.elf \
    images/out/linux/{bzImage,vmlinux,initramfs.cpio.gz,version}
for name in "${!exe[@]}"; do
    stage "${exe[$name]#"$root/"}"
done
mkdir -p "$work/tree/tests" "$work/tree/.nested/lib"
# Their shared libraries (the host's root has only what its own tools need): LD_LIBRARY_PATH.
for bin in target/release/vmm "${exe[@]}"; do
    ldd "$bin" | grep -o '/[^ ]*\.so[^ ]*' || true
done | sort -u | while read -r lib; do
    cp -L "$lib" "$work/tree/.nested/lib/"
done
size_mib=$(($(du -sm "$work/tree" | cut -f1) * 5 / 4 + 64))
mkfs.ext4 -q -F -L vmm-workspace -d "$work/tree" "$work/workspace.img" "${size_mib}M" ||
    die "mkfs.ext4 could not make the workspace disk"

# Boot the host; the console streams here. The last lines are kept for a diagnosis.
token=$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
append="console=ttyS0 panic=-1 quiet loglevel=4 nested.token=$token nested.root=$root"
log=$work/console.log
echo "nested.sh: booting the nested host (QEMU TCG, SVM, $mem) for: ${specs[*]}" >&2
coproc QEMU {
    exec qemu-system-x86_64 -accel tcg,thread=multi -cpu EPYC-v1,+svm,+npt -smp 2 -m "$mem" \
        -M pc -nodefaults -display none -no-reboot -serial stdio -monitor none \
        -kernel images/out/linux/bzImage -initrd images/out/linux/nested-host.cpio.gz -append "$append" \
        -drive "file=$work/workspace.img,format=raw,if=virtio,readonly=on" </dev/null 2>&1
}
qemu_pid=$QEMU_PID
exec {console}<&"${QEMU[0]}"
status=
started=$(date +%s)
while true; do
    rc=0
    IFS= read -r -t "$silence" line <&"$console" || rc=$?
    if ((rc != 0)); then
        if ((rc > 128)); then
            echo "nested.sh: no console output for ${silence}s: the nested host is stuck; its last lines:" >&2
            tail -n 30 "$log" | sed 's/^/nested.sh: | /' >&2
        fi
        break
    fi
    line=${line%$'\r'}
    printf '%s\n' "$line" >>"$log"
    # TCG lists the EPYC features it lacks (nrip-save, xsavec, ...); kvm_amd needs none of them.
    [[ $line == *"TCG doesn't support requested feature"* && $line != *svm* && $line != *npt* ]] && continue
    printf '%s\n' "$line"
    if [[ $line =~ ^nested-host:\ done\ $token\ status=([0-9]+)$ ]]; then
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
wait "$qemu_pid" 2>/dev/null || true
elapsed=$(($(date +%s) - started))

if [[ -z $status ]]; then
    grep -q 'qemu-system-x86_64:.*svm' "$log" 2>/dev/null &&
        die "this QEMU's TCG does not offer AMD SVM: $(grep -m1 'qemu-system-x86_64:' "$log")"
    die "the nested host ended without finishing after ${elapsed}s (console log: ${log#"$root/"})"
fi
if ((status == 3)); then
    die "the nested host could not run tests: $(grep -m1 'nested-host: error' "$log" || echo 'see the console above')"
fi
echo "nested.sh: nested host done in ${elapsed}s, status $status" >&2
exit "$status"
