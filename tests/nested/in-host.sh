#!/bin/sh
# The nested host's side of tests/nested.sh (run by images/nested-host/init from the workspace
# disk). Each line of .nested/job is "NAME LIMIT EXECUTABLE [ARG...]": the test binaries run one
# after another, each bounded by LIMIT seconds. A binary that overruns its bound is reported with
# where every process of its tree stood (command line, state, each thread's wchan and kernel
# stack), then killed; reaping it is bounded too. Exit status: the number of failed binaries.
here=$(cd "$(dirname "$0")" && pwd)
say() { echo "nested-host: $*"; }

# descendants PID — PID and every process below it.
descendants() {
    echo "$1"
    for child in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        descendants "$child"
    done
}

# where PID — what each process of PID's tree is doing.
where() {
    for p in $(descendants "$1"); do
        [ -d /proc/"$p" ] || continue
        say "  pid $p: $(tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null | cut -c1-300)"
        say "    $(grep '^State' /proc/"$p"/status 2>/dev/null)"
        for t in /proc/"$p"/task/*; do
            say "    thread ${t##*/} ($(cat "$t"/comm 2>/dev/null)) wchan=$(cat "$t"/wchan 2>/dev/null)"
            sed 's/^/nested-host:       /' "$t"/stack 2>/dev/null
        done
    done
}

kill_tree() {
    for p in $(descendants "$1"); do
        kill -9 "$p" 2>/dev/null
    done
}

# The shared libraries of vmm and the test binaries, staged by tests/nested.sh.
export LD_LIBRARY_PATH="$here/lib"
# Record every guest shutdown (triple fault) that KVM sees, with the guest RIP before AMD's KVM
# resets the vCPU (SVM exit code 0x7f), and the exceptions KVM injects but #UD (which it
# intercepts and reflects all the time, the test guest's ring-3 services use ud2); shown after a
# failed test binary.
trace=/sys/kernel/tracing
if mount -t tracefs tracefs "$trace" 2>/dev/null || [ -e "$trace/trace" ]; then
    echo 'exit_reason == 127' >"$trace/events/kvm/kvm_exit/filter" &&
        echo 1 >"$trace/events/kvm/kvm_exit/enable" &&
        echo 'exception != 6' >"$trace/events/kvm/kvm_inj_exception/filter" &&
        echo 1 >"$trace/events/kvm/kvm_inj_exception/enable" ||
        say "cannot trace KVM shutdown exits"
fi
show_trace() {
    [ -r "$trace/trace" ] || return
    grep -E 'kvm_exit|kvm_inj_exception' "$trace/trace" | tail -n 20 | sed 's/^/nested-host: trace: /'
    echo >"$trace/trace"
}

failed=0
total=0
while read -r name limit exe args; do
    case "$name" in '' | '#'*) continue ;; esac
    total=$((total + 1))
    say "run $name (bounded to ${limit}s)"
    status_file=/tmp/nested-status.$name
    rm -f "$status_file"
    # shellcheck disable=SC2086 # ARGs are words
    (
        "$exe" $args
        echo $? >"$status_file"
    ) </dev/null &
    runner=$!
    start=$(date +%s)
    while [ ! -e "$status_file" ]; do
        if [ $(($(date +%s) - start)) -ge "$limit" ]; then
            say "TIMEOUT: $name still running after ${limit}s; where it stood:"
            where "$runner"
            kill_tree "$runner"
            # Reaping is bounded too: a process stuck in the kernel is reported again, not waited for.
            n=0
            while [ ! -e "$status_file" ] && [ $n -lt 30 ]; do
                sleep 1
                n=$((n + 1))
            done
            if [ ! -e "$status_file" ]; then
                say "TIMEOUT: $name could not be reaped within 30 s of SIGKILL:"
                where "$runner"
            fi
            echo 124 >"$status_file"
            break
        fi
        sleep 1
    done
    status=$(cat "$status_file")
    say "end $name status=$status after $(($(date +%s) - start))s"
    if [ "$status" != 0 ]; then
        failed=$((failed + 1))
        show_trace
    fi
done <"$here/job"
say "$total test binaries, $failed failed"
exit "$failed"
