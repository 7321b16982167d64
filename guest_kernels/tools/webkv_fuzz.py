#!/usr/bin/env python3
"""Throw malformed and hostile traffic at a running webkv while a well-behaved client
checks that service stays correct and fast.

    webkv_fuzz.py [--host 127.0.0.1] [--port 8080] [--seconds 20] [--workers 16] [--slow 40]

Workers pick at random: random bytes, mutated valid requests, half-closed and reset
(RST) connections, oversized headers and bodies, abandoned partial requests; --slow
slowloris connections trickle a request one byte every few seconds.  The checker does
PUT/GET/DELETE round trips on a keep-alive connection and records its worst latency.
Exit status 0 if the checker saw no wrong answer and /status still answers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import struct
import sys
import threading
import time

VALID = [
    b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT /kv/fz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /kv/fz HTTP/1.1\r\n\r\n",
    b"DELETE /kv/fz HTTP/1.1\r\n\r\n",
    b"GET /keys?prefix=f HTTP/1.1\r\n\r\n",
    b"PUT /kv/fz2 HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(4)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[pos % len(b)] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
        elif op == 2 and b:
            del b[pos : pos + rng.randrange(1, 10)]
        else:
            b[pos:pos] = rng.choice(
                [b"\r\n", b"\n", b":", b" ", b"\0", b"Content-Length: 99999\r\n"]
            )
    return bytes(b)


def attack(host: str, port: int, rng: random.Random) -> None:
    kind = rng.randrange(8)
    s = socket.create_connection((host, port), timeout=5)
    try:
        if kind == 0:
            s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000))))
        elif kind == 1:
            s.sendall(mutate(rng, rng.choice(VALID)) * rng.randrange(1, 4))
        elif kind == 2:  # half-close after a partial request
            s.sendall(rng.choice(VALID)[: rng.randrange(1, 30)])
            s.shutdown(socket.SHUT_WR)
        elif kind == 3:  # reset in the middle
            s.sendall(
                b"PUT /kv/rst HTTP/1.1\r\nContent-Length: 60000\r\n\r\n"
                + b"z" * rng.randrange(0, 30000)
            )
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif kind == 4:  # huge header
            s.sendall(
                b"GET / HTTP/1.1\r\nX-Big: " + b"a" * rng.randrange(8000, 20000) + b"\r\n\r\n"
            )
        elif kind == 5:  # too large a body
            s.sendall(b"PUT /kv/big HTTP/1.1\r\nContent-Length: 70000\r\n\r\n" + b"b" * 1000)
        elif kind == 6:  # many pipelined requests, never read
            s.sendall(b"".join(rng.choice(VALID) for _ in range(rng.randrange(10, 200))))
        else:  # abandoned partial request
            s.sendall(b"GET /kv/abandon HTTP/1.1\r\nHo")
        s.settimeout(0.2)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
    finally:
        s.close()


def slowloris(host: str, port: int, stop: threading.Event) -> None:
    request = b"GET /status HTTP/1.1\r\nHost: slow\r\nX-A: " + b"b" * 50 + b"\r\n\r\n"
    while not stop.is_set():
        try:
            s = socket.create_connection((host, port), timeout=5)
            for byte in request:
                if stop.wait(random.uniform(1, 4)):
                    break
                s.sendall(bytes([byte]))
            s.close()
        except OSError:
            time.sleep(0.5)


def checker(host: str, port: int, stop: threading.Event, report: dict) -> None:
    rng = random.Random(7)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    n = 0
    while not stop.is_set():
        key, value = f"check{rng.randrange(50)}", f"v{n}-{rng.random()}".encode()
        t0 = time.monotonic()
        try:
            conn.request("PUT", f"/kv/{key}", body=value)
            r = conn.getresponse()
            r.read()
            conn.request("GET", f"/kv/{key}")
            g = conn.getresponse()
            body = g.read()
        except (OSError, http.client.HTTPException) as exc:
            report["errors"].append(f"checker: {exc!r}")
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
            continue
        dt = time.monotonic() - t0
        report["worst_ms"] = max(report["worst_ms"], dt * 1000)
        if r.status not in (201, 204) or g.status != 200 or body != value:
            report["errors"].append(f"checker: PUT {r.status} GET {g.status} {body[:40]!r}")
        n += 1
    report["round_trips"] = n
    conn.close()


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--slow", type=int, default=40)
    a = p.parse_args()
    stop = threading.Event()
    report = {"errors": [], "worst_ms": 0.0, "round_trips": 0, "attacks": 0}

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                attack(a.host, a.port, rng)
                report["attacks"] += 1
            except OSError:
                pass

    threads = [threading.Thread(target=checker, args=(a.host, a.port, stop, report))]
    threads += [threading.Thread(target=worker, args=(i,)) for i in range(a.workers)]
    threads += [
        threading.Thread(target=slowloris, args=(a.host, a.port, stop), daemon=True)
        for _ in range(a.slow)
    ]
    for t in threads:
        t.start()
    time.sleep(a.seconds)
    stop.set()
    for t in threads[: 1 + a.workers]:
        t.join(30)
    try:
        c = http.client.HTTPConnection(a.host, a.port, timeout=10)
        c.request("GET", "/status")
        status = json.loads(c.getresponse().read())
    except Exception as exc:
        status = None
        report["errors"].append(f"status: {exc!r}")
    print(
        json.dumps(
            {
                "fuzz": "done",
                "attacks": report["attacks"],
                "checker_round_trips": report["round_trips"],
                "checker_worst_ms": round(report["worst_ms"], 1),
                "errors": len(report["errors"]),
                "status": status,
            }
        )
    )
    for e in report["errors"][:10]:
        print(" ", e)
    return 0 if not report["errors"] and status else 1


if __name__ == "__main__":
    sys.exit(main())
