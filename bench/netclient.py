#!/usr/bin/env python3
"""Network load for bench/run.py net, run inside the benchmark's network namespace
(`ip netns exec NS bench/netclient.py ...`); prints one JSON object.

    netclient.py udp IP SECONDS   UDP echo (port 7) of 64-byte requests: round trips one at a time,
                                  then the rate with 64 requests in flight
    netclient.py vsock UDS SECONDS  vsock echo (guest port 1234) through vmm's Unix socket: round
                                    trips of 64 bytes, then throughput of 4000-byte messages

Standard library only.
"""

import json
import socket
import statistics
import sys
import time

ECHO_PORT = 7


def udp(ip, seconds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    addr = (ip, ECHO_PORT)
    payload = b"x" * 64
    # Warm-up (ARP, the guest leaving its idle sleep).
    for _ in range(50):
        s.sendto(payload, addr)
        try:
            s.recv(2048)
        except socket.timeout:
            pass
    rtts, lost = [], 0
    end = time.monotonic() + seconds / 2
    while time.monotonic() < end:
        t = time.perf_counter()
        s.sendto(payload, addr)
        try:
            s.recv(2048)
            rtts.append(time.perf_counter() - t)
        except socket.timeout:
            lost += 1
    # 64 in flight: a reply lets the next request go; a timeout puts the lost one back.
    s.settimeout(0.2)
    for _ in range(64):
        s.sendto(payload, addr)
    done, start = 0, time.perf_counter()
    end = time.monotonic() + seconds / 2
    while time.monotonic() < end:
        try:
            s.recv(2048)
            done += 1
        except socket.timeout:
            lost += 1
        s.sendto(payload, addr)
    elapsed = time.perf_counter() - start
    return {"rtt_us": statistics.median(rtts) * 1e6, "rate1": len(rtts) / (seconds / 2),
            "rate64": done / elapsed, "lost": float(lost)}


def vsock(uds, seconds):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(uds)
    s.settimeout(5)
    s.sendall(b"CONNECT 1234\n")
    line = b""
    while not line.endswith(b"\n"):
        line += s.recv(1)
    if not line.startswith(b"OK "):
        raise SystemExit(f"vsock CONNECT refused: {line!r}")
    msg = b"y" * 64
    rtts = []
    end = time.monotonic() + seconds / 2
    while time.monotonic() < end:
        t = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(s.recv(4096))
        rtts.append(time.perf_counter() - t)
    # Throughput: keep 256 KiB in flight (the device's credit), count what comes back.
    block = b"z" * 4000
    sent = received = 0
    start = time.perf_counter()
    end = time.monotonic() + seconds / 2
    s.setblocking(False)
    while time.monotonic() < end:
        if sent - received < 256 * 1024:
            try:
                sent += s.send(block)
            except BlockingIOError:
                pass
        try:
            received += len(s.recv(65536))
        except BlockingIOError:
            pass
    elapsed = time.perf_counter() - start
    return {"rtt_us": statistics.median(rtts) * 1e6, "mib_s": received / elapsed / (1 << 20)}


def main():
    kind, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    result = udp(target, seconds) if kind == "udp" else vsock(target, seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
