#!/usr/bin/env python3
"""Benchmarks vmm against QEMU on this host, with the project's test guest.

    bench/run.py [boot|snapshot|pipe|growth|net|disk|memory|migration|all] [--runs N] [--write-docs]

Every figure is measured for vmm and for QEMU in the same invocation, alternating runs (vmm, QEMU,
vmm, QEMU, ...), and reported as median (min-max) with the ratio of the medians. It is a
benchmark: it reports and never asserts on timing. A run that fails (timeout, crash, guest FAIL
line) is reported as failed and the benchmark goes on. The result is a Markdown section on stdout;
--write-docs also replaces that section in docs/BENCHMARKS.md. See bench/README.md.

Python 3.11, standard library only (matplotlib, if installed, draws the growth plot).
"""

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VMM = REPO / "target/release/vmm"
GUEST = REPO / "images/out/testguest.elf"
DOCS = REPO / "docs/BENCHMARKS.md"
QEMU = "qemu-system-x86_64"

MiB = 1 << 20

BOOT_TIMEOUT = 30.0  # s from spawn to the ready line / to exit
TICK_TIMEOUT = 10.0  # s between tick lines (the guest's default interval is 1 s)
SNAPSHOT_TIMEOUT = 120.0  # s for one save (vmm snapshot, QEMU migrate)
EXIT_GRACE = 5.0  # s a process gets to end after SIGTERM / QMP quit before SIGKILL
QMP_POLL = 0.002  # s between QMP status polls

READY_RE = re.compile(r"testguest: ready cpus=(\d+) ram=(\d+)")
TICK_RE = re.compile(r"testguest: tick t=(\d+)((?: cpu\d+=\d+)*)")
GUEST_FAIL_RE = re.compile(r"testguest: FAIL")
VMM_RUNNING_RE = re.compile(r"vmm: VM '.*' running")
VMM_SNAPSHOT_RE = re.compile(r"paused ([\d.]+) ms, durable after ([\d.]+) ms, (\d+) bytes on disk")
VMM_STREAM_RE = re.compile(r"paused ([\d.]+) ms, complete after ([\d.]+) ms, (\d+) bytes through the stream")


class BenchError(Exception):
    """One run failed; the message says why. The run is reported as failed."""


class SetupError(Exception):
    """The benchmark cannot run on this host at all (no /dev/kvm, no QEMU, no guest)."""


def now():
    return time.monotonic()


def ms(seconds):
    return seconds * 1000.0


# ---------------------------------------------------------------------------------------------
# Processes


class Proc:
    """A child process in its own process group, whose stdout and stderr lines are collected with
    the time each was read, by one reader thread per stream.

    Use it as a context manager: leaving the block ends the process (SIGTERM, then SIGKILL) and
    anything else in its process group (such as QEMU's `cat` for exec: migration)."""

    live = set()  # every Proc not yet closed, for the last-resort cleanup in main()

    def __init__(self, argv, label, stdin=subprocess.DEVNULL):
        self.label = label
        self.lines = {"out": [], "err": []}  # stream -> [(time, text)]
        self.cursor = {"out": 0, "err": 0}  # next line expect() looks at
        self.eof = {"out": False, "err": False}
        self.cond = threading.Condition()
        self.exit_time = None
        self.exited = threading.Event()
        self.start = now()
        self.popen = subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        Proc.live.add(self)
        self.pid = self.popen.pid
        self.threads = [
            threading.Thread(target=self._read, args=("out", self.popen.stdout), daemon=True),
            threading.Thread(target=self._read, args=("err", self.popen.stderr), daemon=True),
            threading.Thread(target=self._wait, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _read(self, stream, pipe):
        for raw in iter(pipe.readline, b""):
            t = now()
            with self.cond:
                self.lines[stream].append((t, raw.decode(errors="replace").rstrip("\r\n")))
                self.cond.notify_all()
        with self.cond:
            self.eof[stream] = True
            self.cond.notify_all()

    def _wait(self):
        self.popen.wait()
        with self.cond:
            self.exit_time = now()
            self.exited.set()
            self.cond.notify_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tail(self, n=3):
        """The last lines of both streams, for error messages."""
        with self.cond:
            last = sorted(self.lines["out"][-n:] + self.lines["err"][-n:])
        return " | ".join(text for _, text in last[-n:]) or "(no output)"

    def expect(self, regex, stream="out", timeout=10.0):
        """Waits for the next line of `stream` that matches `regex` (lines before it are consumed)
        and returns (time it was read, match). A guest FAIL line, the stream's end or the timeout
        raise BenchError."""
        deadline = now() + timeout
        with self.cond:
            while True:
                lines = self.lines[stream]
                while self.cursor[stream] < len(lines):
                    t, text = lines[self.cursor[stream]]
                    self.cursor[stream] += 1
                    if GUEST_FAIL_RE.search(text):
                        raise BenchError(f"{self.label}: guest failed: {text}")
                    match = regex.search(text)
                    if match:
                        return t, match
                if self.eof[stream]:
                    status = self.popen.returncode
                    raise BenchError(f"{self.label} closed its output (exit status {status}) while "
                                     f"waiting for /{regex.pattern}/: {self.tail()}")
                remaining = deadline - now()
                if remaining <= 0:
                    raise BenchError(f"{self.label}: no /{regex.pattern}/ within {timeout:g} s: "
                                     f"{self.tail()}")
                self.cond.wait(remaining)

    def wait_exit(self, timeout):
        """Waits for the process to end; returns (exit time, exit status)."""
        if not self.exited.wait(timeout):
            raise BenchError(f"{self.label} still running {timeout:g} s later: {self.tail()}")
        return self.exit_time, self.popen.returncode

    def send(self, sig):
        if not self.exited.is_set():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def close(self, sig=signal.SIGTERM, grace=EXIT_GRACE):
        """Ends the process: `sig`, then SIGKILL to its whole group after `grace` seconds (or at
        once for what is left of the group once it has ended)."""
        self.send(sig)
        self.exited.wait(grace)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.exited.wait()
        for thread in self.threads:
            thread.join(timeout=EXIT_GRACE)
        Proc.live.discard(self)


def live_children(pid):
    """PIDs of the children of `pid` that have not exited (zombies excluded)."""
    kids = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                kids.update(Path(f"/proc/{pid}/task/{task}/children").read_text().split())
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        return set()
    live = set()
    for kid in kids:
        try:
            state = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in ("Z", "X"):
            live.add(kid)
    return live


def run_command(argv, timeout):
    """Runs a short command (such as `vmm snapshot`); returns its stdout. Fails on non-zero exit."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{shlex.join(argv)}: no answer within {timeout:g} s") from None
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(argv)}: exit status {done.returncode}: "
                         f"{(done.stderr or done.stdout).strip()}")
    return done.stdout


# ---------------------------------------------------------------------------------------------
# QMP


class QMP:
    """A QMP client on a Unix socket: greeting and capabilities negotiation on connect; execute()
    returns a command's "return" value, skipping asynchronous events."""

    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = now() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if now() > deadline:
                    self.sock.close()
                    raise BenchError(f"QMP socket {path} did not accept within {timeout:g} s")
                time.sleep(0.001)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")
        if "QMP" not in self._receive():
            raise BenchError("QMP: unexpected greeting")
        self.execute("qmp_capabilities")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()
        self.sock.close()

    def _receive(self):
        try:
            line = self.file.readline()
        except (TimeoutError, OSError) as e:
            raise BenchError(f"QMP: {e}") from None
        if not line:
            raise BenchError("QMP: connection closed")
        return json.loads(line)

    def execute(self, command, arguments=None):
        message = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._receive()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise BenchError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            # anything else is an asynchronous event

    def poll(self, command, done, timeout):
        """Runs `command` every QMP_POLL s until done(reply) is true; returns that reply."""
        deadline = now() + timeout
        while True:
            reply = self.execute(command)
            if done(reply):
                return reply
            if now() > deadline:
                raise BenchError(f"QMP {command}: still {reply} after {timeout:g} s")
            time.sleep(QMP_POLL)


# ---------------------------------------------------------------------------------------------
# Command lines


@dataclass
class Env:
    vmm: Path  # copy of target/release/vmm taken at start
    guest: Path  # copy of images/out/testguest.elf taken at start
    qemu: str
    tmp: Path
    serial: int = 0

    def unique(self, prefix):
        """A fresh path in the temp dir, e.g. for a socket or a snapshot."""
        self.serial += 1
        return self.tmp / f"{prefix}-{self.serial}"

    def vmm_run(self, cmdline, mem, vcpus, sock):
        return [str(self.vmm), "run", "--kernel", str(self.guest), "--cmdline", cmdline,
                "--mem", mem, "--vcpus", str(vcpus), "--name", sock.stem, "--api-sock", str(sock)]

    def vmm_snapshot(self, sock, out):
        return [str(self.vmm), "snapshot", "--api-sock", str(sock), "--out", str(out)]

    def vmm_resume(self, snapshot, sock):
        return [str(self.vmm), "resume", str(snapshot), "--api-sock", str(sock)]

    def qemu_run(self, cmdline, mem, vcpus, qmp, incoming=None):
        argv = [self.qemu, "-enable-kvm", "-cpu", "host,-arch-capabilities", "-M", "microvm,acpi=on",
                "-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot",
                "-kernel", str(self.guest), "-append", cmdline, "-m", mem, "-smp", str(vcpus),
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming is not None:
            argv += ["-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
        return argv

    def show(self, argv):
        """A command line as the docs print it: repo-relative paths, $TMP for the temp dir."""
        text = shlex.join(argv)
        text = text.replace(self.qemu, QEMU)
        text = text.replace(str(self.vmm), "target/release/vmm")
        text = text.replace(str(self.guest), "images/out/testguest.elf")
        return text.replace(str(self.tmp), "$TMP")


# ---------------------------------------------------------------------------------------------
# Measurements


def read_mappings(pid):
    """Every mapping of /proc/PID/smaps as (path, size bytes, Rss bytes)."""
    mappings = []
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if re.match(r"[0-9a-f]+-[0-9a-f]+$", fields[0]):
                mappings.append([" ".join(fields[5:]), 0, 0])
            elif fields[0] == "Size:":
                mappings[-1][1] = int(fields[1]) * 1024
            elif fields[0] == "Rss:":
                mappings[-1][2] = int(fields[1]) * 1024
    return mappings


def rss_overhead(pid, guest_bytes):
    """Total Rss minus the Rss of the guest-memory mapping: the one anonymous mapping whose size
    equals guest memory."""
    mappings = read_mappings(pid)
    anonymous = ("", "/dev/zero (deleted)")
    guest = [m for m in mappings if m[1] == guest_bytes
             and (m[0] in anonymous or m[0].startswith("/memfd:"))]
    if len(guest) != 1:
        raise BenchError(f"expected one anonymous mapping of {guest_bytes} bytes, found {len(guest)}")
    return sum(m[2] for m in mappings) - guest[0][2]


def disk_bytes(path):
    """Bytes allocated on disk (st_blocks * 512) for a file or every file under a directory."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files)


def wait_touched(vm, vcpus, min_ticks=2):
    """Waits for tick lines until at least `min_ticks` arrived and every vCPU's counter shows a
    verified pass (so all of its memory was written). Returns the ms between consecutive ticks."""
    times = []
    while True:
        _, match = vm.expect(TICK_RE, timeout=TICK_TIMEOUT)
        times.append(int(match[1]))
        counters = [int(c) for c in re.findall(r"=(\d+)", match[2])]
        if len(times) >= min_ticks and len(counters) == vcpus and min(counters) >= 1:
            return [b - a for a, b in zip(times, times[1:])]


def boot_poweroff(env, kind):
    """workload=poweroff, 512M, 1 vCPU: ms from spawn to the ready line and to process exit."""
    sock = env.unique(f"{kind}-boot")
    argv = (env.vmm_run("workload=poweroff", "512M", 1, sock) if kind == "vmm"
            else env.qemu_run("workload=poweroff", "512M", 1, sock))
    with Proc(argv, kind) as vm:
        ready, _ = vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
        exited, status = vm.wait_exit(BOOT_TIMEOUT)
    if status != 0:
        raise BenchError(f"{kind} exited with status {status} after powering off")
    return {"ready_ms": ms(ready - vm.start), "exit_ms": ms(exited - vm.start)}


def boot_rss(env, kind):
    """workload=idle, 512M, 1 vCPU: MiB of Rss outside guest memory, read after the ready line."""
    sock = env.unique(f"{kind}-rss")
    argv = (env.vmm_run("workload=idle", "512M", 1, sock) if kind == "vmm"
            else env.qemu_run("workload=idle", "512M", 1, sock))
    with Proc(argv, kind) as vm:
        vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
        overhead = rss_overhead(vm.pid, 512 * MiB)
    return {"overhead_mib": overhead / MiB}


def snapshot_vmm(env, cmdline, mem, vcpus):
    """Boots, waits until the workload touched its memory, `vmm snapshot`, SIGKILL, `vmm resume`:
    pause, durable, bytes on disk, resume to running and to the first tick line."""
    snapshot = env.unique("vmm-snapshot")
    try:
        sock = env.unique("vmm-snap")
        with Proc(env.vmm_run(cmdline, mem, vcpus, sock), "vmm run") as vm:
            vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
            intervals = wait_touched(vm, vcpus)
            out = run_command(env.vmm_snapshot(sock, snapshot), SNAPSHOT_TIMEOUT)
            vm.close(signal.SIGKILL)
        saved = VMM_SNAPSHOT_RE.search(out)
        if not saved:
            raise BenchError(f"vmm snapshot printed no figures: {out.strip()}")
        result = {"pause_ms": float(saved[1]), "durable_ms": float(saved[2]),
                  "disk_mib": disk_bytes(snapshot) / MiB, "tick_ms": intervals}
        with Proc(env.vmm_resume(snapshot, env.unique("vmm-resume")), "vmm resume") as vm:
            running, _ = vm.expect(VMM_RUNNING_RE, stream="err", timeout=BOOT_TIMEOUT)
            progress, _ = vm.expect(TICK_RE, timeout=TICK_TIMEOUT)
        result.update(running_ms=ms(running - vm.start), progress_ms=ms(progress - vm.start))
        return result
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def qemu_save(qmp, vm, state, background=False):
    """Saves a running QEMU to the file `state` through QMP, bandwidth cap lifted: stop-and-copy
    (`stop`, then `migrate` to `exec:cat > FILE`) or background-snapshot; waits for its `cat`
    and fsyncs the file, then quits QEMU. Returns the moments the save started, completed and was
    durable, and the final query-migrate reply."""
    qmp.execute("migrate-set-parameters", {"max-bandwidth": 100 << 30})
    if background:
        qmp.execute("migrate-set-capabilities",
                    {"capabilities": [{"capability": "background-snapshot", "state": True}]})
    start = now()
    if not background:
        qmp.execute("stop")
    qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state))}"})
    info = qmp.poll("query-migrate", migration_done, SNAPSHOT_TIMEOUT)
    done = now()
    wait_until(lambda: not live_children(vm.pid), EXIT_GRACE, "QEMU's cat to finish")
    fd = os.open(state, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    durable = now()
    qmp.execute("quit")
    return start, done, durable, info


def snapshot_qemu(env, cmdline, mem, vcpus):
    """Boots, waits until the workload touched its memory, QMP stop + migrate to `exec:cat > FILE`
    + fsync, quit; then -incoming from the file and cont: the same figures as snapshot_vmm."""
    state = env.unique("qemu-state")
    try:
        qmp_path = env.unique("qemu-snap")
        with Proc(env.qemu_run(cmdline, mem, vcpus, qmp_path), "qemu") as vm:
            vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
            intervals = wait_touched(vm, vcpus)
            with QMP(qmp_path) as qmp:
                start, saved, durable, _ = qemu_save(qmp, vm, state)
            vm.wait_exit(EXIT_GRACE)
        result = {"pause_ms": ms(saved - start), "durable_ms": ms(durable - start),
                  "disk_mib": disk_bytes(state) / MiB, "tick_ms": intervals}
        qmp_path = env.unique("qemu-resume")
        with Proc(env.qemu_run(cmdline, mem, vcpus, qmp_path, incoming=state), "qemu -incoming") as vm:
            with QMP(qmp_path) as qmp:
                status = qmp.poll("query-status", lambda r: r["status"] != "inmigrate", SNAPSHOT_TIMEOUT)
                if status["status"] != "paused":
                    raise BenchError(f"QEMU came back {status['status']!r}, not paused")
                qmp.execute("cont")
                running = now()
            progress, _ = vm.expect(TICK_RE, timeout=TICK_TIMEOUT)
        result.update(running_ms=ms(running - vm.start), progress_ms=ms(progress - vm.start))
        return result
    finally:
        state.unlink(missing_ok=True)


def pipe_vmm(env, compress):
    """Boots, waits until the workload touched its memory, then
    `vmm snapshot --out - --stop [--compress] | vmm resume -`: ms from starting the snapshot
    command to the resumed VM's `running` line and to its first tick line, and bytes through the
    pipe."""
    sock_a, sock_b = env.unique("vmm-pipe-a"), env.unique("vmm-pipe-b")
    with Proc(env.vmm_run(PIPE_CMDLINE, "1G", 2, sock_a), "vmm run") as src:
        src.expect(READY_RE, timeout=BOOT_TIMEOUT)
        intervals = wait_touched(src, 2)
        argv = env.vmm_snapshot(sock_a, "-") + ["--stop"] + (["--compress"] if compress else [])
        start = now()
        client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, start_new_session=True)
        try:
            with Proc([str(env.vmm), "resume", "-", "--api-sock", str(sock_b)], "vmm resume -",
                      stdin=client.stdout) as dst:
                client.stdout.close()
                running, _ = dst.expect(VMM_RUNNING_RE, stream="err", timeout=SNAPSHOT_TIMEOUT)
                progress, _ = dst.expect(TICK_RE, timeout=TICK_TIMEOUT)
                _, err = client.communicate(timeout=SNAPSHOT_TIMEOUT)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        src.wait_exit(EXIT_GRACE)
    saved = VMM_STREAM_RE.search(err.decode(errors="replace"))
    if not saved:
        raise BenchError(f"vmm snapshot --out - printed no figures: {err.decode(errors='replace').strip()}")
    return {"total_ms": ms(running - start), "progress_ms": ms(progress - start),
            "pause_ms": float(saved[1]), "pipe_mib": int(saved[3]) / MiB, "tick_ms": intervals}


def pipe_qemu(env):
    """The same with QEMU: QMP `stop` + `migrate` to `exec:cat > FIFO` (bandwidth cap lifted) into
    a QEMU started with `-incoming "exec:cat FIFO"`, then `cont` there: ms from `stop` to the reply
    to `cont` and to the first tick line, and the RAM bytes QEMU reports transferred."""
    fifo = env.unique("qemu-fifo")
    os.mkfifo(fifo)
    try:
        qmp_a, qmp_b = env.unique("qemu-pipe-a"), env.unique("qemu-pipe-b")
        with Proc(env.qemu_run(PIPE_CMDLINE, "1G", 2, qmp_a), "qemu") as src:
            src.expect(READY_RE, timeout=BOOT_TIMEOUT)
            intervals = wait_touched(src, 2)
            with Proc(env.qemu_run(PIPE_CMDLINE, "1G", 2, qmp_b, incoming=fifo), "qemu -incoming") as dst, \
                    QMP(qmp_a) as qa, QMP(qmp_b) as qb:
                qa.execute("migrate-set-parameters", {"max-bandwidth": 100 << 30})
                start = now()
                qa.execute("stop")
                qa.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(fifo))}"})
                info = qa.poll("query-migrate", migration_done, SNAPSHOT_TIMEOUT)
                status = qb.poll("query-status", lambda r: r["status"] != "inmigrate", SNAPSHOT_TIMEOUT)
                if status["status"] != "paused":
                    raise BenchError(f"QEMU came back {status['status']!r}, not paused")
                qb.execute("cont")
                running = now()
                progress, _ = dst.expect(TICK_RE, timeout=TICK_TIMEOUT)
                qa.execute("quit")
        return {"total_ms": ms(running - start), "progress_ms": ms(progress - start),
                "pipe_mib": info["ram"]["transferred"] / MiB, "tick_ms": intervals}
    finally:
        fifo.unlink(missing_ok=True)


def migration_done(reply):
    status = reply.get("status")
    if status in ("failed", "cancelled"):
        raise BenchError(f"QEMU migration {status}: {reply.get('error-desc', '')}")
    return status == "completed"


def wait_until(condition, timeout, what):
    deadline = now() + timeout
    while not condition():
        if now() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.001)


# ---------------------------------------------------------------------------------------------
# Running and reporting


class Series:
    """The results of one kind of run: a list of dicts of figures, and the failures."""

    def __init__(self, label):
        self.label = label
        self.results = []
        self.failures = []

    def run(self, function, *args):
        try:
            result = function(*args)
        except BenchError as e:
            self.failures.append(str(e))
            log(f"  {self.label}: FAILED: {e}")
            return
        self.results.append(result)
        log(f"  {self.label}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()
                                             if isinstance(v, float)))

    def values(self, key):
        return [r[key] for r in self.results]

    def median(self, key):
        values = self.values(key)
        return statistics.median(values) if values else None

    def cell(self, key, digits=1):
        """'median (min–max)' of one figure, or 'failed'."""
        values = self.values(key)
        if not values:
            return "failed"
        med = statistics.median(values)
        return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"

    def failure_note(self, runs):
        if not self.failures:
            return None
        reasons = "; ".join(sorted(set(self.failures)))
        return f"{self.label}: {len(self.failures)} of {runs} runs failed: {reasons}"


def ratio(vmm, qemu, key):
    a, b = vmm.median(key), qemu.median(key)
    return f"{a / b:.2f}×" if a is not None and b else "—"


def log(text):
    print(text, file=sys.stderr, flush=True)


def host_line(env, runs):
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    kvm = "kvm_pvm (no VMX/SVM)" if Path("/sys/module/kvm_pvm").exists() else "hardware KVM"
    commit = git("rev-parse", "--short", "HEAD")
    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    built = datetime.datetime.fromtimestamp(env.vmm.stat().st_mtime, datetime.timezone.utc)
    digest = hashlib.sha256(env.vmm.read_bytes()).hexdigest()[:12]
    qemu_version = subprocess.run([env.qemu, "--version"], capture_output=True, text=True)
    qemu_version = qemu_version.stdout.splitlines()[0].replace("QEMU emulator version ", "")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = Path("/proc/loadavg").read_text().split()[0]
    return (f"Measured {date} on {cpu} ({os.cpu_count()} CPUs, load average {load} at start), "
            f"Linux {os.uname().release}, KVM: {kvm}; vmm binary built {built:%Y-%m-%d %H:%M} UTC "
            f"(sha256 {digest}…; tree at {commit}{dirty}); QEMU {qemu_version}. "
            f"{runs} run{'s' if runs > 1 else ''} of each, vmm and QEMU alternating; median (min–max).")


def git(*args):
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "?"


def commands_block(invocation, argvs):
    lines = [f"    {invocation}", *[f"    {line}" for line in argvs]]
    return ("Commands (`$TMP` is the benchmark's temporary directory; it runs copies of "
            "`target/release/vmm` and `images/out/testguest.elf` taken at start, so a rebuild "
            "during the run cannot mix binaries):\n\n" + "\n".join(lines))


def boot_benchmark(env, runs, invocation):
    vmm_boot, qemu_boot = Series("vmm boot"), Series("QEMU boot")
    vmm_rss, qemu_rss = Series("vmm RSS"), Series("QEMU RSS")
    for i in range(runs):
        log(f"boot: round {i + 1}/{runs}")
        vmm_boot.run(boot_poweroff, env, "vmm")
        qemu_boot.run(boot_poweroff, env, "qemu")
        vmm_rss.run(boot_rss, env, "vmm")
        qemu_rss.run(boot_rss, env, "qemu")

    ready_ratio = ratio(vmm_boot, qemu_boot, "ready_ms")
    rows = [
        ("start → ready line (ms)", vmm_boot.cell("ready_ms"), qemu_boot.cell("ready_ms"),
         ready_ratio, "≤ 0.6× QEMU"),
        ("start → process exit, `workload=poweroff` (ms)", vmm_boot.cell("exit_ms"),
         qemu_boot.cell("exit_ms"), ratio(vmm_boot, qemu_boot, "exit_ms"), ""),
        ("RSS outside guest memory, `workload=idle` (MiB)", vmm_rss.cell("overhead_mib", 2),
         qemu_rss.cell("overhead_mib", 2), ratio(vmm_rss, qemu_rss, "overhead_mib"), "< 4 MiB"),
    ]
    sock = env.tmp / "vm.sock"
    argvs = [env.show(env.vmm_run("workload=poweroff", "512M", 1, sock)),
             env.show(env.qemu_run("workload=poweroff", "512M", 1, sock)),
             "(RSS: the same with `workload=idle`; /proc/PID/smaps read after the ready line)"]
    failures = [n for s in (vmm_boot, qemu_boot, vmm_rss, qemu_rss) if (n := s.failure_note(runs))]
    return "\n\n".join([
        "## Boot (`bench/run.py boot`)",
        host_line(env, runs),
        table(("", "vmm", "QEMU", "vmm/QEMU", "target"), rows),
        "Guest: the test guest, 512 MiB, 1 vCPU. *start* is the spawn of the process; *ready* is "
        "the moment the guest's `testguest: ready` line was read from the process's stdout. RSS "
        "overhead = total Rss in /proc/PID/smaps minus the Rss of the anonymous mapping the size "
        "of guest memory.",
        "Failed runs: " + ("none." if not failures else "\n\n- " + "\n- ".join(failures)),
        commands_block(invocation, argvs),
        "Measured elsewhere, earlier, on this kind of host (`../shared/DESIGN.md`, \"Peers to "
        "measure against\"; not in this run): start → guest ready QEMU 88 ms, Firecracker 59 ms, "
        "Cloud Hypervisor 55 ms; VMM RSS overhead Firecracker 4.2 MiB, Cloud Hypervisor 6.6 MiB.",
    ])


SNAP_CMDLINE = "workload=mem mem.size=128M tick.ms=10"
FLAT_CMDLINE = "workload=mem mem.size=16M tick.ms=10"
FLAT_SIZES = ("256M", "1G", "4G")


def snapshot_benchmark(env, runs, invocation):
    vmm, qemu = Series("vmm snapshot"), Series("QEMU snapshot")
    flat = {size: Series(f"vmm resume {size}") for size in FLAT_SIZES}
    for i in range(runs):
        log(f"snapshot: round {i + 1}/{runs}")
        vmm.run(snapshot_vmm, env, SNAP_CMDLINE, "1G", 2)
        qemu.run(snapshot_qemu, env, SNAP_CMDLINE, "1G", 2)
    for i in range(runs):
        log(f"resume flatness: round {i + 1}/{runs}")
        for size, series in flat.items():
            series.run(snapshot_vmm, env, FLAT_CMDLINE, size, 1)

    rows = [
        ("pause (ms) — QEMU: `stop` sent → migration completed", vmm.cell("pause_ms"),
         qemu.cell("pause_ms"), ratio(vmm, qemu, "pause_ms"), "≤ 0.5× QEMU"),
        ("snapshot durable (ms) — QEMU: + `cat` done + fsync", vmm.cell("durable_ms"),
         qemu.cell("durable_ms"), ratio(vmm, qemu, "durable_ms"), ""),
        ("bytes on disk (MiB)", vmm.cell("disk_mib"), qemu.cell("disk_mib"),
         ratio(vmm, qemu, "disk_mib"), "≤ touched (256 MiB)"),
        ("resume → running (ms)", vmm.cell("running_ms"), qemu.cell("running_ms"),
         ratio(vmm, qemu, "running_ms"), "< 5 ms"),
        ("resume → guest progress (ms)", vmm.cell("progress_ms"), qemu.cell("progress_ms"),
         ratio(vmm, qemu, "progress_ms"), "< 10 ms"),
    ]
    flat_rows = [(size, s.cell("running_ms"), s.cell("progress_ms"), s.cell("pause_ms"),
                  s.cell("disk_mib")) for size, s in flat.items()]
    sock = env.tmp / "vm.sock"
    snap = env.tmp / "snapshot"
    argvs = [env.show(env.vmm_run(SNAP_CMDLINE, "1G", 2, sock)),
             env.show(env.vmm_snapshot(sock, snap)) + "   # then SIGKILL the VM",
             env.show(env.vmm_resume(snap, env.tmp / "resumed.sock")),
             env.show(env.qemu_run(SNAP_CMDLINE, "1G", 2, sock)),
             "# QMP: migrate-set-parameters {\"max-bandwidth\": 107374182400}; stop; "
             "migrate {\"uri\": \"exec:cat > $TMP/state\"}; query-migrate until completed; "
             "fsync $TMP/state; quit",
             env.show(env.qemu_run(SNAP_CMDLINE, "1G", 2, sock, incoming=env.tmp / "state")),
             "# QMP: query-status until not inmigrate (it is paused); cont",
             f"(flatness: vmm with `--cmdline '{FLAT_CMDLINE}' --vcpus 1 --mem 256M|1G|4G`)"]
    failures = [n for s in (vmm, qemu, *flat.values()) if (n := s.failure_note(runs))]
    return "\n\n".join([
        "## Snapshot and resume (`bench/run.py snapshot`)",
        host_line(env, runs),
        f"Guest: 1 GiB, 2 vCPUs, `{SNAP_CMDLINE}` (256 MiB written by the workload, plus the "
        "guest's own kernel, page tables and stacks), snapshotted after every vCPU verified a "
        "pass over its region and at least two tick lines.",
        table(("", "vmm", "QEMU", "vmm/QEMU", "target"), rows),
        "vmm's pause and durable times are the ones `vmm snapshot` prints; the VM runs on after "
        "the pause and is then killed with SIGKILL. QEMU's pause is its whole save (`stop` until "
        "`query-migrate` says completed); durable adds waiting for the `cat` child and an fsync "
        "of the file. *resume → running*: from spawning `vmm resume` to its `running` line on "
        "stderr (printed once the vCPU threads are started); for QEMU from spawning `qemu -incoming` to the reply to `cont`. *→ guest "
        "progress*: to the first `testguest: tick` line read from stdout (QEMU starts the vCPUs "
        "before it replies to `cont`, so that line can arrive first). Both resume from a file "
        "just written, i.e. from the page cache.",
        tick_note([vmm, qemu, *flat.values()]),
        "Resume time against guest memory size (vmm; 1 vCPU, `" + FLAT_CMDLINE + "`, 16 MiB "
        "written):",
        table(("guest memory", "resume → running (ms)", "resume → guest progress (ms)",
               "pause (ms)", "on disk (MiB)"), flat_rows),
        "Target: resume → running < 5 ms and → guest progress < 10 ms, flat from 256 MiB to 4 GiB "
        "(QEMU at 1 GiB is in the first table).",
        "Failed runs: " + ("none." if not failures else "\n\n- " + "\n- ".join(failures)),
        commands_block(invocation, argvs),
        "Measured elsewhere, earlier, on this kind of host (`../shared/DESIGN.md`, \"Peers to "
        "measure against\"; not in this run; 1 GiB guest, 256 MiB touched): resume → running / "
        "next guest progress Firecracker 11 ms / 14 ms, Cloud Hypervisor 42 ms (userfaultfd), "
        "QEMU 0.49–0.66 s; full snapshot Firecracker 5.0 s (1 GiB file, fsync), Cloud Hypervisor "
        "3.9 s (no fsync), QEMU 395 ms stop+save (258 MiB file).",
    ])


PIPE_CMDLINE = SNAP_CMDLINE


def pipe_benchmark(env, runs, invocation):
    vmm, vmm_z, qemu = Series("vmm pipe"), Series("vmm pipe --compress"), Series("QEMU pipe")
    for i in range(runs):
        log(f"pipe: round {i + 1}/{runs}")
        vmm.run(pipe_vmm, env, False)
        vmm_z.run(pipe_vmm, env, True)
        qemu.run(pipe_qemu, env)
    rows = [
        ("request → guest running on the other side (ms)", vmm.cell("total_ms"), vmm_z.cell("total_ms"),
         qemu.cell("total_ms"), ratio(vmm, qemu, "total_ms"), "≤ 0.5× QEMU"),
        ("request → guest progress on the other side (ms)", vmm.cell("progress_ms"),
         vmm_z.cell("progress_ms"), qemu.cell("progress_ms"), ratio(vmm, qemu, "progress_ms"), ""),
        ("bytes through the pipe (MiB)", vmm.cell("pipe_mib"), vmm_z.cell("pipe_mib"),
         qemu.cell("pipe_mib"), ratio(vmm, qemu, "pipe_mib"), "≤ touched (256 MiB)"),
    ]
    sock = env.tmp / "a.sock"
    argvs = [env.show(env.vmm_run(PIPE_CMDLINE, "1G", 2, sock)),
             env.show(env.vmm_snapshot(sock, "-") + ["--stop"]) + " | "
             + env.show([str(env.vmm), "resume", "-", "--api-sock", str(env.tmp / "b.sock")])
             + "   # and with --compress",
             env.show(env.qemu_run(PIPE_CMDLINE, "1G", 2, sock)),
             env.show(env.qemu_run(PIPE_CMDLINE, "1G", 2, env.tmp / "b.sock", incoming=env.tmp / "fifo"))
             + "   # $TMP/fifo made by mkfifo",
             "# QMP on the first: migrate-set-parameters {\"max-bandwidth\": 107374182400}; stop; "
             "migrate {\"uri\": \"exec:cat > $TMP/fifo\"}; query-migrate until completed; "
             "on the second: query-status until not inmigrate; cont"]
    failures = [n for s in (vmm, vmm_z, qemu) if (n := s.failure_note(runs))]
    return "\n\n".join([
        "## A VM moved through a pipe (`bench/run.py pipe`)",
        host_line(env, runs),
        f"Guest: 1 GiB, 2 vCPUs, `{PIPE_CMDLINE}` (256 MiB written by the workload), moved after "
        "every vCPU verified a pass over its region. vmm: `vmm snapshot --out - --stop | vmm resume "
        "-` (stop-and-copy: the guest is paused from the request until it runs on the other side). "
        "QEMU: the same, non-live: `stop`, then `migrate` through `exec:cat` into a FIFO read by a "
        "QEMU started with `-incoming`, then `cont` there. Times start at the spawn of `vmm "
        "snapshot` / the `stop` command; *running* is the resumed vmm's `running` line / the reply "
        "to `cont`; *progress* the first tick line read from the resumed guest. QEMU's bytes are "
        "the RAM bytes `query-migrate` reports transferred.",
        table(("", "vmm", "vmm --compress", "QEMU", "vmm/QEMU", "target"), rows),
        "Failed runs: " + ("none." if not failures else "\n\n- " + "\n- ".join(failures)),
        commands_block(invocation, argvs),
    ])


NET_NS = "vmm-bench-net"
NET_SECONDS = 4.0  # of load per run: half one request at a time, half 64 in flight
NETCLIENT = REPO / "bench/netclient.py"
NET_READY_RE = re.compile(r"testguest: net ready")
VSOCK_READY_RE = re.compile(r"testguest: vsock ready")


def ip(*args):
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SetupError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def net_setup():
    """A network namespace with a bridge at 10.0.0.1/24 and one TAP port for each VMM."""
    subprocess.run(["ip", "netns", "del", NET_NS], capture_output=True)
    ip("netns", "add", NET_NS)
    ip("-n", NET_NS, "link", "set", "lo", "up")
    ip("-n", NET_NS, "link", "add", "br0", "type", "bridge")
    ip("-n", NET_NS, "addr", "add", "10.0.0.1/24", "dev", "br0")
    ip("-n", NET_NS, "link", "set", "br0", "up")
    for tap in ("tapv", "tapq"):
        ip("-n", NET_NS, "tuntap", "add", "dev", tap, "mode", "tap")
        ip("-n", NET_NS, "link", "set", tap, "master", "br0")
        ip("-n", NET_NS, "link", "set", tap, "up")


def net_client(kind, target):
    argv = ["ip", "netns", "exec", NET_NS, sys.executable, str(NETCLIENT), kind, str(target), str(NET_SECONDS)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=NET_SECONDS + 60)
    if done.returncode != 0:
        raise BenchError(f"netclient {kind}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def in_netns(argv):
    return ["ip", "netns", "exec", NET_NS, *argv]


def net_vmm_argv(env, sock):
    return in_netns(env.vmm_run("workload=net net.ip=10.0.0.2", "256M", 1, sock) + ["--net", "tap=tapv"])


def net_qemu_argv(env, qmp):
    return in_netns(env.qemu_run("workload=net net.ip=10.0.0.3", "256M", 1, qmp) + [
        "-global", "virtio-mmio.force-legacy=false",
        "-netdev", "tap,id=n0,ifname=tapq,script=no,downscript=no,vhost=off",
        "-device", "virtio-net-device,netdev=n0,mac=02:00:00:00:00:03"])


def net_run(env, kind):
    sock = env.unique(f"{kind}-net")
    argv = net_vmm_argv(env, sock) if kind == "vmm" else net_qemu_argv(env, sock)
    with Proc(argv, kind) as vm:
        vm.expect(NET_READY_RE, timeout=BOOT_TIMEOUT)
        return net_client("udp", "10.0.0.2" if kind == "vmm" else "10.0.0.3")


def vsock_argv(env, sock, uds):
    return env.vmm_run("workload=vsock", "256M", 1, sock) + ["--vsock", f"cid=3,uds={uds}"]


def vsock_run(env):
    sock, uds = env.unique("vmm-vsock"), env.unique("vsock-uds")
    with Proc(vsock_argv(env, sock, uds), "vmm") as vm:
        vm.expect(VSOCK_READY_RE, timeout=BOOT_TIMEOUT)
        return net_client("vsock", uds)


def net_benchmark(env, runs, invocation):
    net_setup()
    try:
        vmm, qemu, vsock = Series("vmm net"), Series("QEMU net"), Series("vmm vsock")
        for i in range(runs):
            log(f"net: round {i + 1}/{runs}")
            vmm.run(net_run, env, "vmm")
            qemu.run(net_run, env, "qemu")
            vsock.run(vsock_run, env)
    finally:
        subprocess.run(["ip", "netns", "del", NET_NS], capture_output=True)
    rows = [
        ("UDP echo round trip, 1 in flight (µs)", vmm.cell("rtt_us"), qemu.cell("rtt_us"),
         ratio(vmm, qemu, "rtt_us"), "≤ 1× QEMU"),
        ("UDP echo requests/s, 1 in flight", vmm.cell("rate1", 0), qemu.cell("rate1", 0),
         ratio(vmm, qemu, "rate1"), "≥ 1× QEMU"),
        ("UDP echo requests/s, 64 in flight", vmm.cell("rate64", 0), qemu.cell("rate64", 0),
         ratio(vmm, qemu, "rate64"), "≥ 1× QEMU"),
        ("requests lost (timeouts)", vmm.cell("lost", 0), qemu.cell("lost", 0), "", ""),
    ]
    vsock_rows = [
        ("vsock echo round trip, 64 bytes (µs)", vsock.cell("rtt_us")),
        ("vsock echo throughput, 4000-byte messages, 256 KiB in flight (MiB/s each way)", vsock.cell("mib_s")),
    ]
    sock = env.tmp / "a.sock"
    argvs = ["# in a network namespace with bridge br0 (10.0.0.1/24) and TAP ports tapv, tapq",
             env.show(net_vmm_argv(env, sock)), env.show(net_qemu_argv(env, sock)),
             "ip netns exec NS bench/netclient.py udp 10.0.0.2|10.0.0.3 " + str(NET_SECONDS),
             env.show(vsock_argv(env, sock, env.tmp / "v.sock")),
             "bench/netclient.py vsock $TMP/v.sock " + str(NET_SECONDS)]
    failures = [n for s in (vmm, qemu, vsock) if (n := s.failure_note(runs))]
    return "\n\n".join([
        "## Network and vsock (`bench/run.py net`)",
        host_line(env, runs),
        "Guest: 256 MiB, 1 vCPU, `workload=net` (the test guest's polled virtio-net driver answering "
        "UDP echo on port 7; no offloads, no mergeable buffers) on a TAP port of a bridge in a network "
        "namespace. vmm: `--net tap=tapv`; QEMU: its userspace virtio-net (`vhost=off`, vhost is absent "
        "here) on virtio-mmio. The client (`bench/netclient.py`, Python) sends 64-byte requests from "
        f"the bridge's address for {NET_SECONDS / 2:.0f} s one at a time, then {NET_SECONDS / 2:.0f} s "
        "with 64 in flight; the Python client itself bounds the rates. vsock has no QEMU peer here "
        "(QEMU's vsock needs vhost): absolute figures, against the test guest's echo on port 1234.",
        table(("", "vmm", "QEMU", "vmm/QEMU", "target"), rows),
        table(("vmm only", "vmm"), vsock_rows),
        "Failed runs: " + ("none." if not failures else "\n\n- " + "\n- ".join(failures)),
        commands_block(invocation, argvs),
    ])


DISK_SIZES = ((16 * MiB, "16 MiB"), (1 << 30, "1 GiB"), (4 << 30, "4 GiB"))
DISK_CMDLINE = "workload=disk disk.rounds=0 disk.sectors=2048 tick.ms=100"


def make_disk(path, size):
    """A disk image of `size` bytes, all data (no holes): the copy has everything to copy."""
    block = bytes(range(256)) * (4 * MiB // 256)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def disk_snapshot_run(env, disk):
    """A 256 MiB guest rewriting the first MiB of its disk all the time is snapshotted while it
    runs: the pause, the time until durable, and the bytes of the snapshot (its disk copy)."""
    snapshot = env.unique("disk-snapshot")
    try:
        sock = env.unique("vmm-disk")
        with Proc(env.vmm_run(DISK_CMDLINE, "256M", 1, sock) + ["--disk", str(disk)], "vmm run") as vm:
            vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
            vm.expect(TICK_RE, timeout=TICK_TIMEOUT)
            out = run_command(env.vmm_snapshot(sock, snapshot), SNAPSHOT_TIMEOUT)
            vm.expect(TICK_RE, timeout=TICK_TIMEOUT)  # still running, still verifying
            vm.close(signal.SIGKILL)
        saved = VMM_SNAPSHOT_RE.search(out)
        if not saved:
            raise BenchError(f"vmm snapshot printed no figures: {out.strip()}")
        return {"pause_ms": float(saved[1]), "durable_ms": float(saved[2]), "disk_mib": disk_bytes(snapshot) / MiB}
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def disk_benchmark(env, runs, invocation):
    series = {}
    for size, label in DISK_SIZES:
        disk = env.tmp / f"disk-{label.replace(' ', '')}.img"
        log(f"disk: writing a {label} disk image")
        make_disk(disk, size)
        series[label] = (disk, Series(f"vmm {label} disk"))
    for i in range(runs):
        log(f"disk: round {i + 1}/{runs}")
        for label, (disk, s) in series.items():
            s.run(disk_snapshot_run, env, disk)
    rows = [(label, s.cell("pause_ms", 2), s.cell("durable_ms"), s.cell("disk_mib", 0))
            for label, (_, s) in series.items()]
    plot = plot_disk(series)
    failures = [n for _, s in series.values() if (n := s.failure_note(runs))]
    sock = env.tmp / "a.sock"
    argvs = [env.show(env.vmm_run(DISK_CMDLINE, "256M", 1, sock) + ["--disk", "$TMP/disk-1GiB.img"]),
             env.show(env.vmm_snapshot(sock, env.tmp / "snap"))]
    return "\n\n".join([
        "## Snapshots of a VM with a disk (`bench/run.py disk`)",
        host_line(env, runs),
        "Guest: 256 MiB, 1 vCPU, rewriting, reading back and verifying the first MiB of its disk "
        f"without pause (`{DISK_CMDLINE}`), on disk images of 16 MiB, 1 GiB and 4 GiB full of data; "
        "snapshotted while it runs. The snapshot directory holds the disk as at the pause, copied "
        "after the guest continues (copy-before-write for the chunks it overwrites first): the "
        "pause should not depend on the disk's size; the time until durable grows with the data "
        "copied. No QEMU figure: its migration leaves disks to shared storage, and `savevm` needs "
        "qcow2 internal snapshots, a different thing.",
        table(("disk", "pause (ms)", "durable (ms)", "snapshot on disk (MiB)"), rows),
        f"![pause and durable time against disk size]({plot})" if plot else
        "(No plot: matplotlib is not installed.)",
        "Failed runs: " + ("none." if not failures else "\n\n- " + "\n- ".join(failures)),
        commands_block(invocation, argvs),
    ])


GROWTH_SIZES = (("256M", "128M"), ("768M", "384M"), ("1536M", "768M"))  # touched, per vCPU


def growth_benchmark(env, runs, invocation):
    series = {}
    for touched, per_vcpu in GROWTH_SIZES:
        series[touched] = (Series(f"vmm {touched}"), Series(f"QEMU {touched}"))
    for i in range(runs):
        for touched, per_vcpu in GROWTH_SIZES:
            log(f"growth: {touched} touched, round {i + 1}/{runs}")
            cmdline = f"workload=mem mem.size={per_vcpu} tick.ms=10"
            vmm, qemu = series[touched]
            vmm.run(snapshot_vmm, env, cmdline, "2G", 2)
            qemu.run(snapshot_qemu, env, cmdline, "2G", 2)
    rows = []
    for touched, (vmm, qemu) in series.items():
        rows.append((touched, vmm.cell("pause_ms"), qemu.cell("pause_ms"), ratio(vmm, qemu, "pause_ms"),
                     vmm.cell("durable_ms"), qemu.cell("durable_ms"), ratio(vmm, qemu, "durable_ms"),
                     vmm.cell("disk_mib"), qemu.cell("disk_mib")))
    plot = plot_growth(series)
    failures = [n for pair in series.values() for s in pair if (n := s.failure_note(runs))]
    sock = env.tmp / "vm.sock"
    argvs = [env.show(env.vmm_run("workload=mem mem.size=128M|384M|768M tick.ms=10", "2G", 2, sock)),
             env.show(env.vmm_snapshot(sock, env.tmp / "snapshot")) + "   # then SIGKILL, resume",
             "# QEMU: as in the snapshot benchmark, with -m 2G"]
    return "\n\n".join([
        "## How snapshot cost grows with touched memory (`bench/run.py growth`)",
        host_line(env, runs),
        "Guest: 2 GiB, 2 vCPUs, `workload=mem` writing 256 MiB, 768 MiB and 1.5 GiB in all; "
        "measured as in the snapshot benchmark (vmm: pause, and durable = fsync'd and renamed "
        "while the guest runs on; QEMU: stop + save + fsync, the guest stopped throughout).",
        table(("touched", "pause vmm (ms)", "pause QEMU (ms)", "vmm/QEMU", "durable vmm (ms)",
               "durable QEMU (ms)", "vmm/QEMU", "on disk vmm (MiB)", "on disk QEMU (MiB)"), rows),
        "Targets: pause ≤ 0.2× QEMU and durable ≤ 1.0× QEMU at every size.",
        f"![snapshot cost against touched memory]({plot})" if plot else "(no plot: matplotlib missing)",
        "Failed runs: " + ("none." if not failures else "\n\n- " + "\n- ".join(failures)),
        commands_block(invocation, argvs),
    ])


# ---------------------------------------------------------------------------------------------
# Memory: diff snapshots, live snapshots, resume to full speed

DIFF_SIZES = (("16M", 4096), ("32M", 8192), ("128M", 32768))  # dirtied between snapshots, pages
LIVE_RATES = (16, 64, 256)  # MiB/s each of the 2 vCPUs dirties
LIVE_CMDLINE = "workload=mem mem.size=128M mem.rate={rate} tick.ms=20"
WARM_SIZES = (("256M", "128M"), ("512M", "256M"), ("1G", "512M"))  # touched in all, per vCPU
WARM_CMDLINE = "workload=mem mem.size={per_vcpu} tick.ms=20"
VMM_LIVE_RE = re.compile(r"copied running, (\d+) rounds? more")


def diff_cmdline(pages):
    """256 MiB written once, then `pages` 4 KiB pages (contiguous) rewritten every 20 ms."""
    return f"workload=dirty dirty.fill=256M dirty.pages={pages} dirty.stride=4K tick.ms=20"


def wait_ticks(vm, n):
    for _ in range(n):
        vm.expect(TICK_RE, timeout=TICK_TIMEOUT)


def counters(match):
    return [int(c) for c in re.findall(r"=(\d+)", match[2])]


def diff_vmm(env, pages):
    """1 GiB guest, 1 vCPU: a full snapshot, three ticks, then `vmm snapshot --diff`: its pause,
    durable time, and the diff's page file bytes on disk ÷ the bytes the workload dirtied."""
    full, diff = env.unique("vmm-full"), env.unique("vmm-diff")
    try:
        sock = env.unique("vmm-dirty")
        with Proc(env.vmm_run(diff_cmdline(pages), "1G", 1, sock), "vmm run") as vm:
            vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
            wait_ticks(vm, 3)
            run_command(env.vmm_snapshot(sock, full), SNAPSHOT_TIMEOUT)
            wait_ticks(vm, 3)
            out = run_command(env.vmm_snapshot(sock, diff) + ["--diff"], SNAPSHOT_TIMEOUT)
            vm.close(signal.SIGKILL)
        saved = VMM_SNAPSHOT_RE.search(out)
        if not saved:
            raise BenchError(f"vmm snapshot printed no figures: {out.strip()}")
        shown = json.loads(run_command([str(env.vmm), "inspect", "--json", str(diff)], SNAPSHOT_TIMEOUT))
        data = sum(e["len"] for e in shown["manifest"]["memory"]["extents"] if e["kind"] == "data")
        return {"pause_ms": float(saved[1]), "durable_ms": float(saved[2]), "ratio": data / (pages * 4096),
                "disk_mib": disk_bytes(diff) / MiB}
    finally:
        shutil.rmtree(full, ignore_errors=True)
        shutil.rmtree(diff, ignore_errors=True)


def save_qemu(env, cmdline, mem, vcpus, background, touched=None):
    """QEMU saving the guest to a file: stop-and-copy (`stop`, migrate, the guest stopped
    throughout: its pause is the whole save) or background-snapshot (userfaultfd write-protect:
    QEMU's reported downtime). ms of pause and until completed (then fsync'd)."""
    state = env.unique("qemu-save")
    try:
        qmp_path = env.unique("qemu-save")
        with Proc(env.qemu_run(cmdline, mem, vcpus, qmp_path), "qemu") as vm:
            vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
            if touched is None:
                wait_ticks(vm, 3)
            else:
                wait_touched(vm, vcpus)
            with QMP(qmp_path) as qmp:
                start, done, durable, info = qemu_save(qmp, vm, state, background)
            vm.wait_exit(EXIT_GRACE)
        pause = float(info.get("downtime", 0)) if background else ms(done - start)
        return {"pause_ms": pause, "durable_ms": ms(durable - start)}
    finally:
        state.unlink(missing_ok=True)


def live_vmm(env, rate, live):
    """1 GiB guest, 2 vCPUs rewriting 128 MiB each at `rate` MiB/s: `vmm snapshot [--live]`."""
    snap = env.unique("vmm-live")
    try:
        sock = env.unique("vmm-live")
        with Proc(env.vmm_run(LIVE_CMDLINE.format(rate=rate), "1G", 2, sock), "vmm run") as vm:
            vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
            wait_touched(vm, 2)
            out = run_command(env.vmm_snapshot(sock, snap) + (["--live"] if live else []), SNAPSHOT_TIMEOUT)
            vm.close(signal.SIGKILL)
        saved = VMM_SNAPSHOT_RE.search(out)
        if not saved:
            raise BenchError(f"vmm snapshot printed no figures: {out.strip()}")
        result = {"pause_ms": float(saved[1]), "durable_ms": float(saved[2])}
        if live:
            rounds = VMM_LIVE_RE.search(out)
            result["rounds"] = float(rounds[1]) if rounds else float("nan")
        return result
    finally:
        shutil.rmtree(snap, ignore_errors=True)


def full_speed_after(vm, started, vcpus):
    """ms from `started` to the tick line where every vCPU completed a whole pass after resuming:
    its counter two above the first tick line's (the pass it was in when saved may be partial)."""
    _, first = vm.expect(TICK_RE, timeout=TICK_TIMEOUT)
    base = counters(first)
    while True:
        seen, match = vm.expect(TICK_RE, timeout=TICK_TIMEOUT)
        now_counters = counters(match)
        if len(now_counters) == vcpus and all(c >= b + 2 for c, b in zip(now_counters, base)):
            return ms(seen - started)


def warm_vmm(env, per_vcpu, lazy):
    """2 GiB guest, 2 vCPUs each verifying `per_vcpu`: `vmm snapshot --stop`, then `vmm resume
    [--lazy]`: ms to its running line, and to every vCPU's first whole pass."""
    snap = env.unique("vmm-warm")
    try:
        sock = env.unique("vmm-warm")
        with Proc(env.vmm_run(WARM_CMDLINE.format(per_vcpu=per_vcpu), "2G", 2, sock), "vmm run") as vm:
            vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
            wait_touched(vm, 2)
            run_command(env.vmm_snapshot(sock, snap) + ["--stop"], SNAPSHOT_TIMEOUT)
            vm.wait_exit(EXIT_GRACE)
        argv = env.vmm_resume(snap, env.unique("vmm-warm-r")) + (["--lazy"] if lazy else [])
        with Proc(argv, "vmm resume") as vm:
            running, _ = vm.expect(VMM_RUNNING_RE, stream="err", timeout=BOOT_TIMEOUT)
            full = full_speed_after(vm, vm.start, 2)
        return {"running_ms": ms(running - vm.start), "full_ms": full}
    finally:
        shutil.rmtree(snap, ignore_errors=True)


def warm_qemu(env, per_vcpu):
    """The same with QEMU: stop + migrate to a file, then `-incoming` from it and `cont` (QEMU
    loads all memory before it runs)."""
    state = env.unique("qemu-warm")
    cmdline = WARM_CMDLINE.format(per_vcpu=per_vcpu)
    try:
        qmp_path = env.unique("qemu-warm")
        with Proc(env.qemu_run(cmdline, "2G", 2, qmp_path), "qemu") as vm:
            vm.expect(READY_RE, timeout=BOOT_TIMEOUT)
            wait_touched(vm, 2)
            with QMP(qmp_path) as qmp:
                qemu_save(qmp, vm, state)
            vm.wait_exit(EXIT_GRACE)
        qmp_path = env.unique("qemu-warm-r")
        with Proc(env.qemu_run(cmdline, "2G", 2, qmp_path, incoming=state), "qemu -incoming") as vm:
            with QMP(qmp_path) as qmp:
                qmp.poll("query-status", lambda r: r["status"] != "inmigrate", SNAPSHOT_TIMEOUT)
                qmp.execute("cont")
                running = now()
            full = full_speed_after(vm, vm.start, 2)
        return {"running_ms": ms(running - vm.start), "full_ms": full}
    finally:
        state.unlink(missing_ok=True)


def memory_benchmark(env, runs, invocation):
    diffs = {label: Series(f"vmm diff {label}") for label, _ in DIFF_SIZES}
    qemu_full = Series("QEMU stop-and-copy (diff guest)")
    live = {rate: (Series(f"vmm stop-and-copy {rate}"), Series(f"vmm live {rate}"),
                   Series(f"QEMU stop-and-copy {rate}"), Series(f"QEMU background {rate}")) for rate in LIVE_RATES}
    warm = {touched: (Series(f"vmm resume {touched}"), Series(f"vmm resume --lazy {touched}"),
                      Series(f"QEMU resume {touched}")) for touched, _ in WARM_SIZES}
    for i in range(runs):
        log(f"memory: round {i + 1}/{runs}")
        for label, pages in DIFF_SIZES:
            diffs[label].run(diff_vmm, env, pages)
        qemu_full.run(save_qemu, env, diff_cmdline(4096), "1G", 1, False)
        for rate, (stop, liv, qstop, qbg) in live.items():
            cmdline = LIVE_CMDLINE.format(rate=rate)
            stop.run(live_vmm, env, rate, False)
            liv.run(live_vmm, env, rate, True)
            qstop.run(save_qemu, env, cmdline, "1G", 2, False, True)
            qbg.run(save_qemu, env, cmdline, "1G", 2, True, True)
        for touched, per_vcpu in WARM_SIZES:
            default, lazy, qemu = warm[touched]
            default.run(warm_vmm, env, per_vcpu, False)
            lazy.run(warm_vmm, env, per_vcpu, True)
            qemu.run(warm_qemu, env, per_vcpu)

    diff_rows = [(label, s.cell("ratio", 3), s.cell("pause_ms"), s.cell("durable_ms"), qemu_full.cell("pause_ms"),
                  ratio(s, qemu_full, "pause_ms")) for label, s in diffs.items()]
    live_rows = []
    for rate, (stop, liv, qstop, qbg) in live.items():
        live_rows.append((f"{2 * rate} MiB/s", stop.cell("pause_ms"), liv.cell("pause_ms"), liv.cell("rounds", 0),
                          stop.cell("durable_ms"), liv.cell("durable_ms"), ratio(liv, stop, "durable_ms"),
                          qstop.cell("pause_ms"), qbg.cell("pause_ms"), qbg.cell("durable_ms"),
                          ratio(qbg, qstop, "durable_ms")))
    warm_rows = [(touched, d.cell("running_ms"), d.cell("full_ms"), l.cell("full_ms"), q.cell("running_ms"),
                  q.cell("full_ms"), ratio(d, q, "full_ms")) for touched, (d, l, q) in warm.items()]
    plot = plot_memory(diffs, qemu_full, live, warm)
    every = [*diffs.values(), qemu_full, *[s for group in live.values() for s in group],
             *[s for group in warm.values() for s in group]]
    failures = [n for s in every if (n := s.failure_note(runs))]
    sock, snap = env.tmp / "vm.sock", env.tmp / "snapshot"
    argvs = [env.show(env.vmm_run(diff_cmdline(4096), "1G", 1, sock)) + "   # and 8192, 32768 pages",
             env.show(env.vmm_snapshot(sock, snap)) + "; three ticks; " +
             env.show(env.vmm_snapshot(sock, env.tmp / "diff")) + " --diff",
             env.show(env.vmm_run(LIVE_CMDLINE.format(rate=16), "1G", 2, sock)) + "   # and rates 64, 256",
             env.show(env.vmm_snapshot(sock, snap)) + " [--live]",
             "# QEMU: stop; migrate exec:cat > FILE (stop-and-copy), or migrate-set-capabilities "
             "background-snapshot=on; migrate exec:cat > FILE (background); fsync",
             env.show(env.vmm_run(WARM_CMDLINE.format(per_vcpu="128M"), "2G", 2, sock)) +
             "   # and 256M, 512M; snapshot --stop",
             env.show(env.vmm_resume(snap, sock)) + " [--lazy]",
             "# QEMU: stop; migrate exec:cat > FILE; quit; -incoming 'exec:cat FILE'; cont"]
    return "\n\n".join([
        "## Memory: diffs, live snapshots, resume to full speed (`bench/run.py memory`)",
        host_line(env, runs),
        "**Diff snapshots.** Guest: 1 GiB, 1 vCPU, the `dirty` workload: 256 MiB written once, then "
        "the first N 4 KiB pages of it rewritten every 20 ms. A full snapshot, three ticks, then "
        "`vmm snapshot --diff`. *bytes ÷ dirtied*: the guest memory the diff holds as data ÷ N × 4 "
        "KiB (the guest's own stack and counters are a few pages more). QEMU has no diff: its figure is a "
        "stop-and-copy save of the same guest (N = 4096), what it pays for every snapshot.",
        table(("dirtied", "bytes ÷ dirtied", "diff pause (ms)", "diff durable (ms)",
               "QEMU stop-and-copy pause (ms)", "vmm/QEMU pause"), diff_rows),
        "Targets: bytes ÷ dirtied ≤ 1.05; diff pause < 10 ms (Firecracker, measured earlier on "
        "this kind of host: 145 ms for a 32 MiB diff, the guest paused throughout).",
        "**Live snapshots.** Guest: 1 GiB, 2 vCPUs, `workload=mem mem.size=128M` (256 MiB touched) "
        "rewriting its memory at the rate shown (both vCPUs together). vmm stop-and-copy (the "
        "default: memory copied aside while paused) against `--live` (pre-copy rounds while the "
        "guest runs, the pause copies only what is left); QEMU stop-and-copy against its "
        "background-snapshot (userfaultfd write-protect; pause = its reported downtime). Total = "
        "until durable (fsync'd).",
        table(("dirty rate", "vmm pause", "vmm live pause", "live rounds", "vmm total",
               "vmm live total", "live/stop total", "QEMU pause", "QEMU bg pause", "QEMU bg total",
               "QEMU bg/stop total"), live_rows),
        "Targets: live pause < 5 ms; live total ≤ 2× vmm's stop-and-copy total. All times ms.",
        "**Resume to full speed.** Guest: 2 GiB, 2 vCPUs each verifying its region "
        "(`workload=mem`), saved with `--stop` (QEMU: stop + migrate to a file) and resumed from "
        "the page cache. *full speed*: from spawning the resume to the tick line where both "
        "vCPUs completed a whole pass after resuming (each counter two above the first tick "
        "line's). vmm loads memory in the background by default; `--lazy` only on touch; QEMU "
        "loads everything before it runs.",
        table(("touched", "vmm → running (ms)", "vmm → full speed (ms)", "vmm --lazy → full speed (ms)",
               "QEMU → running (ms)", "QEMU → full speed (ms)", "vmm/QEMU full speed"), warm_rows),
        "Targets: → full speed ≤ 0.5× QEMU, with → running < 5 ms.",
        f"![memory benchmarks]({plot})" if plot else "(no plot: matplotlib missing)",
        "Failed runs: " + ("none." if not failures else "\n\n- " + "\n- ".join(failures)),
        commands_block(invocation, argvs),
    ])


# ---------------------------------------------------------------------------------------------
# Live migration

MIGRATION_RATES = (20, 100, 200)  # MiB/s the guest dirties, both vCPUs together
MIGRATION_SIZES = (("256M", "1G", "128M"), ("1G", "2G", "512M"))  # touched, guest memory, per vCPU
MIGRATION_CMDLINE = "workload=mem mem.size={per_vcpu} mem.rate={rate} tick.ms=20"
VMM_MIGRATED_RE = re.compile(r"migrated to \S+ in ([\d.]+) ms: downtime ([\d.]+) ms.*?, (\d+) bytes sent"
                             r".*?(\d+) rounds? after the first pass(?:, throttled up to (\d+)%)?")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_files(env):
    """A CA and certificates for both sides (openssl), made once per benchmark run."""
    d = env.tmp / "tls"
    if (d / "dst.pem").exists():
        return d
    d.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=bench CA", "-keyout", "ca.key", "-out", "ca.pem")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for side in ("src", "dst"):
        openssl("req", *ec, "-subj", f"/CN={side}", "-keyout", f"{side}.key", "-out", f"{side}.csr")
        openssl("x509", "-req", "-in", f"{side}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", "san.ext", "-out", f"{side}.pem")
    return d


def tls_args(d, side):
    return ["--tls-cert", str(d / f"{side}.pem"), "--tls-key", str(d / f"{side}.key"), "--tls-ca", str(d / "ca.pem")]


def migrate_vmm(env, touched, mem, per_vcpu, rate, tls=False, connections=1):
    """Boots the guest, waits until it touched its memory, then `vmm migrate` to a `vmm receive`
    on loopback TCP (plain, or TLS; over `connections` connections): the figures vmm migrate
    reports; the destination must show guest progress."""
    cmdline = MIGRATION_CMDLINE.format(per_vcpu=per_vcpu, rate=rate // 2)
    port = free_port()
    sock_a, sock_b = env.unique("vmm-mig-a"), env.unique("vmm-mig-b")
    security = tls_args(tls_files(env), "dst") if tls else ["--insecure"]
    with Proc(env.vmm_run(cmdline, mem, 2, sock_a), "vmm run") as src:
        src.expect(READY_RE, timeout=BOOT_TIMEOUT)
        wait_touched(src, 2)
        receive = [str(env.vmm), "receive", "--listen", f"tcp:127.0.0.1:{port}", "--api-sock", str(sock_b),
                   *security]
        with Proc(receive, "vmm receive") as dst:
            dst.expect(re.compile("waiting for a VM"), stream="err", timeout=BOOT_TIMEOUT)
            security = tls_args(tls_files(env), "src") if tls else ["--insecure"]
            out = run_command([str(env.vmm), "migrate", "--api-sock", str(sock_a), "--to",
                               f"tcp:127.0.0.1:{port}", "--connections", str(connections), *security],
                              SNAPSHOT_TIMEOUT)
            dst.expect(TICK_RE, timeout=TICK_TIMEOUT)
            dst.close(signal.SIGKILL)
        src.wait_exit(EXIT_GRACE)
    done = VMM_MIGRATED_RE.search(out)
    if not done:
        raise BenchError(f"vmm migrate printed no figures: {out.strip()}")
    return {"total_ms": float(done[1]), "downtime_ms": float(done[2]), "bytes": float(done[3]),
            "ratio": float(done[3]) / parse_mib(touched) / MiB, "rounds": float(done[4]),
            "throttle": float(done[5] or 0)}


def parse_mib(text):
    return int(text[:-1]) * (1024 if text.endswith("G") else 1)


def migrate_qemu(env, touched, mem, per_vcpu, rate):
    """The same with QEMU: a destination started with `-incoming tcp:127.0.0.1:PORT`, QMP
    `migrate` on the source with the bandwidth cap lifted and a 10 ms downtime limit (vmm's
    default budget); total, downtime and RAM bytes from `query-migrate`."""
    cmdline = MIGRATION_CMDLINE.format(per_vcpu=per_vcpu, rate=rate // 2)
    port = free_port()
    qmp_a, qmp_b = env.unique("qemu-mig-a"), env.unique("qemu-mig-b")
    with Proc(env.qemu_run(cmdline, mem, 2, qmp_a), "qemu") as src:
        src.expect(READY_RE, timeout=BOOT_TIMEOUT)
        wait_touched(src, 2)
        dst_argv = env.qemu_run(cmdline, mem, 2, qmp_b) + ["-incoming", f"tcp:127.0.0.1:{port}"]
        with Proc(dst_argv, "qemu -incoming") as dst, QMP(qmp_a) as qa:
            wait_until(lambda: qmp_b.exists(), BOOT_TIMEOUT, "the destination QEMU's QMP socket")
            with QMP(qmp_b):
                pass
            qa.execute("migrate-set-parameters", {"max-bandwidth": 100 << 30, "downtime-limit": 10})
            qa.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = qa.poll("query-migrate", migration_done, SNAPSHOT_TIMEOUT)
            dst.expect(TICK_RE, timeout=TICK_TIMEOUT)
            qa.execute("quit")
        src.wait_exit(EXIT_GRACE)
    transferred = info["ram"]["transferred"]
    return {"total_ms": float(info["total-time"]), "downtime_ms": float(info["downtime"]),
            "bytes": float(transferred), "ratio": transferred / parse_mib(touched) / MiB,
            "rounds": float(info["ram"].get("dirty-sync-count", 0))}


def migration_benchmark(env, runs, invocation):
    by_rate = {rate: (Series(f"vmm {rate} MiB/s"), Series(f"QEMU {rate} MiB/s")) for rate in MIGRATION_RATES}
    tls = Series("vmm TLS 100 MiB/s")
    lanes = Series("vmm 4 connections 100 MiB/s")
    tls_lanes = Series("vmm TLS 4 connections 100 MiB/s")
    by_size = {touched: (Series(f"vmm {touched} touched"), Series(f"QEMU {touched} touched"))
               for touched, _, _ in MIGRATION_SIZES[1:]}
    base_touched, base_mem, base_per_vcpu = MIGRATION_SIZES[0]
    for i in range(runs):
        log(f"migration: round {i + 1}/{runs}")
        for rate, (v, q) in by_rate.items():
            v.run(migrate_vmm, env, base_touched, base_mem, base_per_vcpu, rate)
            q.run(migrate_qemu, env, base_touched, base_mem, base_per_vcpu, rate)
        tls.run(migrate_vmm, env, base_touched, base_mem, base_per_vcpu, 100, True)
        lanes.run(migrate_vmm, env, base_touched, base_mem, base_per_vcpu, 100, False, 4)
        tls_lanes.run(migrate_vmm, env, base_touched, base_mem, base_per_vcpu, 100, True, 4)
        for touched, mem, per_vcpu in MIGRATION_SIZES[1:]:
            v, q = by_size[touched]
            v.run(migrate_vmm, env, touched, mem, per_vcpu, 20)
            q.run(migrate_qemu, env, touched, mem, per_vcpu, 20)

    def row(label, v, q):
        return (label, v.cell("total_ms"), q.cell("total_ms"), ratio(v, q, "total_ms"),
                v.cell("downtime_ms"), q.cell("downtime_ms"), v.cell("ratio", 2), q.cell("ratio", 2),
                v.cell("rounds", 0), v.cell("throttle", 0))

    rows = [row(f"{base_touched} touched, {rate} MiB/s", v, q) for rate, (v, q) in by_rate.items()]
    rows += [row(f"{touched} touched ({mem} guest), 20 MiB/s", *by_size[touched]) for touched, mem, _ in MIGRATION_SIZES[1:]]
    plain = by_rate[100][0]
    tls_rows = [(label, s.cell("total_ms"), ratio(s, plain, "total_ms"), s.cell("downtime_ms"), s.cell("ratio", 2))
                for label, s in (("plain, 1", plain), ("plain, 4", lanes), ("TLS, 1", tls), ("TLS, 4", tls_lanes))]
    plot = plot_migration(by_rate)
    every = [*[s for pair in by_rate.values() for s in pair], tls, lanes, tls_lanes,
             *[s for pair in by_size.values() for s in pair]]
    failures = [n for s in every if (n := s.failure_note(runs))]
    sock = env.tmp / "vm.sock"
    argvs = [env.show(env.vmm_run(MIGRATION_CMDLINE.format(per_vcpu="128M", rate=10), "1G", 2, sock)) +
             "   # rate = half the total: 10, 50, 100; and 512M per vCPU in 2G",
             "target/release/vmm receive --listen tcp:127.0.0.1:PORT --insecure   # or --tls-cert/--tls-key/--tls-ca",
             "target/release/vmm migrate --api-sock $TMP/vm.sock --to tcp:127.0.0.1:PORT --insecure",
             "# QEMU: the destination with -incoming tcp:127.0.0.1:PORT; on the source, QMP "
             "migrate-set-parameters {max-bandwidth: 100G, downtime-limit: 10}; migrate tcp:127.0.0.1:PORT; "
             "query-migrate until completed"]
    return "\n\n".join([
        "## Live migration (`bench/run.py migration`)",
        host_line(env, runs),
        "Guest: 2 vCPUs each rewriting its region of `workload=mem` at half the rate shown, after "
        "a first verified pass over it. vmm: `vmm migrate` to a `vmm receive` on loopback TCP, "
        "plain (`--insecure`), default 10 ms budget; QEMU: `migrate` to a QEMU with `-incoming` "
        "on loopback TCP, bandwidth cap lifted, `downtime-limit` 10 ms. *total*: vmm's report "
        "(from the request to the destination's confirmation that it took over), QEMU's "
        "`total-time`; *downtime*: vmm's report (guest paused → destination confirmed), QEMU's "
        "`downtime` (stop → completion on the source); *bytes ÷ touched*: bytes through the "
        "connection (vmm: frames; QEMU: RAM `transferred`) ÷ memory the guest touched. Each run "
        "also waits for a tick line from the destination's guest (every vCPU verifying its "
        "memory there).",
        table(("guest", "vmm total (ms)", "QEMU total (ms)", "vmm/QEMU total", "vmm downtime (ms)",
               "QEMU downtime (ms)", "vmm bytes ÷ touched", "QEMU bytes ÷ touched", "vmm rounds",
               "vmm throttle (%)"), rows),
        "Targets: downtime < 10 ms at 100 MiB/s; bytes ≤ 1.2× touched; total ≤ QEMU's.",
        "**TLS and connections** (vmm, 256 MiB touched, 100 MiB/s; TLS 1.3 with both certificates "
        "checked, rustls with the ring provider; `--connections 4` spreads memory over four "
        "connections, a thread each — on this 2-core host they share two cores with the guest's "
        "two vCPUs and the receiver):",
        table(("security, connections", "total (ms)", "÷ plain, 1", "downtime (ms)", "bytes ÷ touched"), tls_rows),
        f"![migration benchmarks]({plot})" if plot else "(no plot: matplotlib missing)",
        "Failed runs: " + ("none." if not failures else "\n\n- " + "\n- ".join(failures)),
        commands_block(invocation, argvs),
    ])


def plot_migration(by_rate):
    """docs/migration.png: total time, downtime and bytes ÷ touched against the dirty rate, vmm
    and QEMU on the same axes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rates = list(by_rate)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in ((axes[0], "total_ms", "total (ms)"), (axes[1], "downtime_ms", "downtime (ms)"),
                           (axes[2], "ratio", "bytes sent ÷ touched")):
        for index, label in ((0, "vmm"), (1, "QEMU")):
            xs, ys, lo, hi = [], [], [], []
            for rate in rates:
                values = by_rate[rate][index].values(key)
                if values:
                    xs.append(rate)
                    ys.append(statistics.median(values))
                    lo.append(ys[-1] - min(values))
                    hi.append(max(values) - ys[-1])
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_xlabel("guest dirty rate (MiB/s), 1 GiB guest, 256 MiB touched")
        ax.set_ylabel(title)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(REPO / "docs/migration.png", dpi=100)
    plt.close(fig)
    return "migration.png"


def plot_memory(diffs, qemu_full, live, warm):
    """docs/memory.png: diff pause against dirtied memory, snapshot pause against dirty rate,
    time to full speed against touched memory; vmm and QEMU on the same axes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def line(ax, xs, series, key, label):
        points = [(x, s.values(key)) for x, s in zip(xs, series) if s.values(key)]
        if not points:
            return
        med = [statistics.median(v) for _, v in points]
        ax.errorbar([x for x, _ in points], med,
                    yerr=[[m - min(v) for m, (_, v) in zip(med, points)],
                          [max(v) - m for m, (_, v) in zip(med, points)]],
                    marker="o", capsize=3, label=label)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    sizes = [int(label[:-1]) for label, _ in DIFF_SIZES]
    line(axes[0], sizes, list(diffs.values()), "pause_ms", "vmm --diff")
    line(axes[0], sizes, [qemu_full] * len(sizes), "pause_ms", "QEMU stop-and-copy (whole)")
    axes[0].set_xlabel("memory dirtied since the last snapshot (MiB), 1 GiB guest")
    axes[0].set_ylabel("guest paused (ms)")
    rates = [2 * r for r in LIVE_RATES]
    labels = ("vmm stop-and-copy", "vmm --live", "QEMU stop-and-copy", "QEMU background")
    for index, label in enumerate(labels):
        line(axes[1], rates, [group[index] for group in live.values()], "pause_ms", label)
    axes[1].set_xlabel("guest dirty rate (MiB/s), 256 MiB touched")
    axes[1].set_ylabel("guest paused (ms)")
    axes[1].set_yscale("log")
    touched = [256, 512, 1024]
    for index, label in enumerate(("vmm", "vmm --lazy", "QEMU")):
        line(axes[2], touched, [group[index] for group in warm.values()], "full_ms", label)
    axes[2].set_xlabel("touched guest memory (MiB), 2 GiB guest")
    axes[2].set_ylabel("resume → full speed (ms)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xlim(left=0)
    axes[0].set_ylim(bottom=0)
    axes[2].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(REPO / "docs/memory.png", dpi=100)
    plt.close(fig)
    return "memory.png"


def plot_disk(series):
    """docs/disk.png: pause and durable against disk size (vmm only: QEMU has no comparable
    figure). Returns its path relative to docs/, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = {label: size / MiB for size, label in DISK_SIZES}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "pause_ms", "guest paused (ms)"),
                           (axes[1], "durable_ms", "snapshot durable (ms)")):
        xs, ys, lo, hi = [], [], [], []
        for label, (_, s) in series.items():
            values = s.values(key)
            if values:
                xs.append(sizes[label])
                ys.append(statistics.median(values))
                lo.append(ys[-1] - min(values))
                hi.append(max(values) - ys[-1])
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label="vmm")
        ax.set_xlabel("disk data (MiB), 256 MiB guest writing its disk")
        ax.set_ylabel(title)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(REPO / "docs/disk.png", dpi=100)
    plt.close(fig)
    return "disk.png"


def plot_growth(series):
    """docs/growth.png: pause and durable against touched memory, vmm and QEMU on the same axes.
    Returns its path relative to docs/, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = {"256M": 256, "768M": 768, "1536M": 1536}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "pause_ms", "guest paused (ms)"),
                           (axes[1], "durable_ms", "snapshot durable (ms)")):
        for index, label in ((0, "vmm"), (1, "QEMU")):
            xs, ys, lo, hi = [], [], [], []
            for touched, pair in series.items():
                values = pair[index].values(key)
                if values:
                    xs.append(sizes[touched])
                    ys.append(statistics.median(values))
                    lo.append(ys[-1] - min(values))
                    hi.append(max(values) - ys[-1])
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_xlabel("touched guest memory (MiB), 2 GiB guest")
        ax.set_ylabel(title)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(REPO / "docs/growth.png", dpi=100)
    plt.close(fig)
    return "growth.png"


def tick_note(series):
    """Says how often the guest printed tick lines, which bounds the 'guest progress' figure."""
    intervals = [t for s in series for r in s.results for t in r["tick_ms"]]
    if not intervals:
        return "Tick interval: unknown (no successful run)."
    interval = statistics.median(intervals)
    if interval <= 50:
        return (f"The guest printed a tick line every {interval:.0f} ms (median of guest time "
                "between lines), so *→ guest progress* is at most that much above the moment "
                "the guest ran again.")
    return (f"**The guest ignored `tick.ms=10`**: it printed a tick line every {interval:.0f} ms "
            "(median of guest time between lines). The guest clock continues from the saved "
            "instant, so *→ guest progress* includes waiting for the next scheduled tick line: it "
            "has ~1 s granularity and mostly measures where in its tick period the guest was "
            "saved, not the cost of resuming.")


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


DOCS_HEADER = """# Benchmarks

vmm against QEMU on the project's test guest. Each section below is generated by
`bench/run.py` (see `bench/README.md`); `--write-docs` replaces only the section of the benchmark
it ran, between its markers. The host is shared and noisy: compare figures within one section, and
read the ratios rather than the absolute values.
"""


def write_docs(sections):
    """Replaces (or appends) each generated section of docs/BENCHMARKS.md, keeping the rest."""
    text = DOCS.read_text() if DOCS.exists() else DOCS_HEADER
    for name, body in sections.items():
        begin, end = f"<!-- bench/run.py {name}: begin -->", f"<!-- bench/run.py {name}: end -->"
        block = f"{begin}\n{body}\n{end}"
        pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text)


def check_host():
    """Returns the QEMU path; raises SetupError naming what is missing."""
    if not os.path.exists("/dev/kvm"):
        raise SetupError("/dev/kvm does not exist: this host has no KVM")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise SetupError("/dev/kvm is not readable and writable by this user")
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise SetupError(f"{QEMU} not found in PATH "
                         "(apt-get install --no-install-recommends qemu-system-x86)")
    if not GUEST.is_file():
        raise SetupError(f"{GUEST.relative_to(REPO)} is missing: run images/build.sh --testguest-only")
    if not VMM.is_file():
        raise SetupError(f"{VMM.relative_to(REPO)} is missing: run cargo build --release -p vmm")
    return qemu


def raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    parser = argparse.ArgumentParser(description="Benchmark vmm against QEMU (see bench/README.md).")
    parser.add_argument("benchmark", nargs="?", default="all",
                        choices=("boot", "snapshot", "pipe", "growth", "net", "disk", "memory", "migration", "all"))
    parser.add_argument("--runs", type=int, default=10, help="runs of each figure per VMM (default 10)")
    parser.add_argument("--write-docs", action="store_true",
                        help="also replace this benchmark's section of docs/BENCHMARKS.md")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    try:
        qemu = check_host()
    except SetupError as e:
        print(f"bench/run.py: {e}", file=sys.stderr)
        return 2

    invocation = shlex.join(["bench/run.py", *sys.argv[1:]])
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # keep nohup's and the shell's choices
            signal.signal(signum, raise_interrupt)
    started = now()
    sections = {}
    try:
        with tempfile.TemporaryDirectory(prefix="vmm-bench-") as tmp:
            tmp = Path(tmp)
            env = Env(vmm=tmp / "vmm", guest=tmp / "testguest.elf", qemu=qemu, tmp=tmp)
            shutil.copy2(VMM, env.vmm)
            shutil.copy2(GUEST, env.guest)
            try:
                if args.benchmark in ("boot", "all"):
                    sections["boot"] = boot_benchmark(env, args.runs, invocation)
                if args.benchmark in ("snapshot", "all"):
                    sections["snapshot"] = snapshot_benchmark(env, args.runs, invocation)
                if args.benchmark in ("pipe", "all"):
                    sections["pipe"] = pipe_benchmark(env, args.runs, invocation)
                if args.benchmark in ("growth", "all"):
                    sections["growth"] = growth_benchmark(env, args.runs, invocation)
                if args.benchmark in ("net", "all"):
                    sections["net"] = net_benchmark(env, args.runs, invocation)
                if args.benchmark in ("disk", "all"):
                    sections["disk"] = disk_benchmark(env, args.runs, invocation)
                if args.benchmark in ("memory", "all"):
                    sections["memory"] = memory_benchmark(env, args.runs, invocation)
                if args.benchmark in ("migration", "all"):
                    sections["migration"] = migration_benchmark(env, args.runs, invocation)
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_IGN)  # let the cleanup finish
                for proc in list(Proc.live):
                    proc.close(signal.SIGKILL, grace=1.0)
    except KeyboardInterrupt:
        print("bench/run.py: interrupted; every VM it started was ended", file=sys.stderr)
        return 130
    print("\n\n".join(sections.values()))
    if args.write_docs:
        write_docs(sections)
        log(f"updated {DOCS.relative_to(REPO)}")
    log(f"bench/run.py: done in {now() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
