#!/bin/sh
# The nested host's side of tests/nested.sh (run by images/nested-host/init from the workspace
# disk). Each line of .nested/job is "NAME LIMIT EXECUTABLE [ARG...]": the test binaries run one
# after another, each bounded by LIMIT seconds. A binary that overruns its bound is reported with
# where every process of its tree stood (command line, state, each thread's wchan and kernel
# stack), then killed; reaping it is bounded too.
#
# A test that fails is run up to twice more, alone: TCG's SVM sometimes hangs or triple-faults a
# Linux guest, fresh or resumed (docs/testing.md). Every attempt is shown; the binary's closing
# "test result:" line counts a test as passed only if an attempt passed, and "nested-host:
# retried" lines name every test that needed more than one.
# Exit status: the number of binaries with a test that failed both attempts.
here=$(cd "$(dirname "$0")" && pwd)
set -f # the job's words are arguments, never patterns
say() { echo "nested-host: $*"; }

# descendants PID — PID and every process below it.
descendants() {
    local child
    echo "$1"
    for child in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        descendants "$child"
    done
}

# where PID — what each process of PID's tree is doing.
where() {
    local p t
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
    local p
    for p in $(descendants "$1"); do
        kill -9 "$p" 2>/dev/null
    done
}

# The last KVM exits and every exception KVM injects but #UD (which it intercepts and reflects
# all the time: the test guest's ring-3 services use ud2), with the guest RIP of each exit
# before AMD's KVM resets a vCPU on a triple fault; shown after a failed test.
trace=/sys/kernel/tracing
if mount -t tracefs tracefs "$trace" 2>/dev/null || [ -e "$trace/trace" ]; then
    echo 256 >"$trace/buffer_size_kb" &&
        echo 1 >"$trace/events/kvm/kvm_exit/enable" &&
        echo 'exception != 6' >"$trace/events/kvm/kvm_inj_exception/filter" &&
        echo 1 >"$trace/events/kvm/kvm_inj_exception/enable" ||
        say "cannot trace KVM exits"
fi
show_trace() {
    [ -r "$trace/trace" ] || return
    grep -E 'kvm_exit|kvm_inj_exception' "$trace/trace" | tail -n 40 | sed 's/^/nested-host: trace: /'
    echo >"$trace/trace"
}

# bounded NAME LIMIT LOG COMMAND... — runs COMMAND within LIMIT seconds, its output streamed
# (with the binary's own "test result:" lines renamed: the runner writes the line that counts)
# and kept in LOG; leaves its exit status in /tmp/nested-status (124: it had to be killed).
bounded() {
    local b_name=$1 b_limit=$2 b_log=$3 runner b_start n
    shift 3
    rm -f /tmp/nested-status /tmp/nested-exit
    (
        (
            "$@" 2>&1 </dev/null
            echo $? >/tmp/nested-exit
        ) | tee "$b_log" | awk '{ sub(/^test result:/, "attempt result:"); print; fflush() }'
    ) &
    runner=$!
    b_start=$(date +%s)
    while kill -0 "$runner" 2>/dev/null && [ ! -e /tmp/nested-exit ]; do
        if [ $(($(date +%s) - b_start)) -ge "$b_limit" ]; then
            say "TIMEOUT: $b_name still running after ${b_limit}s; its last output:"
            tail -n 5 "$b_log" | sed 's/^/nested-host:   | /'
            say "where it stood:"
            where "$runner"
            kill_tree "$runner"
            n=0
            while kill -0 "$runner" 2>/dev/null && [ $n -lt 30 ]; do
                sleep 1
                n=$((n + 1))
            done
            if kill -0 "$runner" 2>/dev/null; then
                say "TIMEOUT: $b_name could not be reaped within 30 s of SIGKILL:"
                where "$runner"
            fi
            echo 124 >/tmp/nested-status
            return
        fi
        sleep 1
    done
    # The output pipeline ends right after the command; bounded all the same.
    n=0
    while kill -0 "$runner" 2>/dev/null && [ $n -lt 10 ]; do
        sleep 1
        n=$((n + 1))
    done
    cat /tmp/nested-exit >/tmp/nested-status 2>/dev/null || echo 125 >/tmp/nested-status
}

# failed_tests LOG — the names libtest lists under its last "failures:" heading.
failed_tests() {
    awk '/^failures:$/ { list = 1; names = ""; next }
         list && /^    [^ ]/ { sub(/^    /, ""); names = names $0 "\n"; next }
         list && /^test result:/ { list = 0 }
         END { printf "%s", names }' "$1"
}

# The shared libraries of vmm and the test binaries, staged by tests/nested.sh.
export LD_LIBRARY_PATH="$here/lib"
failed=0
total=0
while read -r name limit exe args; do
    case "$name" in '' | '#'*) continue ;; esac
    total=$((total + 1))
    say "run $name (bounded to ${limit}s)"
    log=/tmp/nested-$name.log
    start=$(date +%s)
    # shellcheck disable=SC2086 # ARGs are words
    bounded "$name" "$limit" "$log" "$exe" $args
    status=$(cat /tmp/nested-status)
    passed=$(awk '/^test result:/ { p += $4 } END { print p + 0 }' "$log")
    still_failing=0
    if [ "$status" != 0 ]; then
        show_trace
        tests=$(failed_tests "$log")
        [ -n "$tests" ] || still_failing=1 # killed, or failed outside any test
        for t in $tests; do
            ok=0
            for attempt in 2 3; do
                # Let L1 settle after the failed guest: quick back-to-back guests fail more often.
                sleep 5
                say "retry $name: $t (attempt $attempt)"
                bounded "$name:$t" "$limit" "$log.retry" "$exe" --include-ignored --test-threads=1 --exact "$t"
                if [ "$(cat /tmp/nested-status)" = 0 ] && grep -q '^test result: ok. 1 passed' "$log.retry"; then
                    say "retried: $name::$t failed and passed on attempt $attempt"
                    ok=1
                    break
                fi
                show_trace
            done
            if [ $ok = 1 ]; then
                passed=$((passed + 1))
            else
                say "FAILED three times: $name::$t"
                still_failing=$((still_failing + 1))
            fi
        done
    fi
    echo "test result: $([ $still_failing = 0 ] && echo ok || echo FAILED). $passed passed; $still_failing failed; 0 ignored; 0 measured; 0 filtered out (nested host, $name)"
    say "end $name status=$status after $(($(date +%s) - start))s"
    [ "$still_failing" = 0 ] || failed=$((failed + 1))
done <"$here/job"
say "$total test binaries, $failed failed"
exit "$failed"
