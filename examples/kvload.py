"""A webkv load generator: keep-alive HTTP clients that write unique keys and read
them back, now and then overwrite or delete one, recording every request's latency and
every acknowledged write (the latest value of each key, and the deleted keys).

Each client keeps one connection for its whole run and never re-sends a request:
an error status, a wrong value, a closed, reset or refused connection or a time-out
counts as a failed request (and the client then opens a new connection). So a run
with no failures also shows that no keep-alive connection was lost in a hand-off.
"""

from __future__ import annotations

import http.client
import multiprocessing
import statistics
import sys
import time
from pathlib import Path


class Sample:
    __slots__ = ("end", "method", "ms", "start")

    def __init__(self, method: str, start: float, end: float) -> None:
        self.method, self.start, self.end = method, start, end
        self.ms = (end - start) * 1000


class KvLoad:
    """``clients`` keep-alive clients, each in its own process: one client's Python
    (GIL, garbage collection) cannot delay another's, so a long request is the
    server's doing. Results are collected when ``stop`` returns."""

    def __init__(
        self,
        port: int,
        clients: int = 8,
        host: str = "127.0.0.1",
        rate: float = 0.0,
        prefix: str = "load",
    ) -> None:
        """``rate``: requests per second per client (0: each client sends its next
        request as soon as it has the answer, which keeps the server saturated);
        ``prefix``: of the keys (runs against one disk need keys of their own)."""
        self.host, self.port = host, port
        self.acked: dict[str, bytes] = {}  # key → its latest acknowledged value
        self.deleted: set[str] = set()  # keys whose DELETE was acknowledged last
        self.failures: list[str] = []
        self.samples: list[Sample] = []
        self.reconnects = 0
        # Every write attempted: (key, "PUT"/"DELETE", value or None, sent, acknowledged
        # or None), on CLOCK_MONOTONIC: what a power cut at a given moment must keep.
        self.history: list[tuple[str, str, bytes | None, float, float | None]] = []
        context = multiprocessing.get_context("spawn")  # no inherited threads or locks
        self._stop = context.Event()
        self._started = context.Semaphore(0)
        self._pipes = [context.Pipe(duplex=False) for _ in range(clients)]
        self._processes = [
            context.Process(
                target=run_client,
                args=(host, port, i, self._stop, sender, rate, self._started, prefix),
                daemon=True,
            )
            for i, (_, sender) in enumerate(self._pipes)
        ]

    def start(self) -> KvLoad:
        for process in self._processes:
            process.start()
        return self

    def wait_started(self, timeout: float = 60) -> None:
        """Until every client is about to send its first request (spawning Python
        processes takes a while on a busy machine)."""
        deadline = time.monotonic() + timeout
        for _ in self._processes:
            if not self._started.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError("kvload clients did not start in time")

    def stop(self) -> None:
        self._stop.set()
        for (receiver, _), process in zip(self._pipes, self._processes, strict=True):
            if not receiver.poll(60):
                self.failures.append(f"client process {process.pid} sent no results")
                process.kill()
                continue
            samples, acked, deleted, failures, reconnects, history = receiver.recv()
            self.history += history
            self.samples += [Sample(*sample) for sample in samples]
            self.acked.update(acked)  # each client has keys of its own
            self.deleted |= deleted
            self.failures += failures
            self.reconnects += reconnects
            process.join(10)
        self.samples.sort(key=lambda sample: sample.start)

    @property
    def writes(self) -> int:
        """Acknowledged writes that a check covers: keys with their latest value, and
        deleted keys."""
        return len(self.acked) + len(self.deleted)

    def lost_writes(self) -> list[str]:
        """Acknowledged writes that the service no longer returns (asks the live
        service; ``lost_on_disk`` reads the disk itself)."""
        lost = []
        conn = _connect(self.host, self.port)
        for key, value in list(self.acked.items()):
            status, body = _send(conn, "GET", f"/kv/{key}", None)
            if (status, body) != (200, value):
                lost.append(key)
        for key in list(self.deleted):
            if _send(conn, "GET", f"/kv/{key}", None)[0] != 404:
                lost.append(key)
        conn.close()
        return lost

    def lost_on_disk(self, image: str) -> list[str]:
        """Acknowledged writes missing from a webkv disk image, read with the guest's
        own recovery rules (guest_kernels/tools/webkv_disk.py). Read it once the node
        is gone (SIGKILL): the image is then what a fresh boot would recover."""
        with open(image, "rb") as f:
            data = f.read()
        return webkv_disk().check_acknowledged(data, self.acked, self.deleted)


def webkv_disk():
    """The project's disk tool, guest_kernels/tools/webkv_disk.py, as a module."""
    tools = str(Path(__file__).resolve().parent.parent / "guest_kernels" / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import webkv_disk

    return webkv_disk


def _connect(host: str, port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(host, port, timeout=30)


def _send(conn, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    conn.request(method, path, body=body)
    response = conn.getresponse()
    return response.status, response.read()


def run_client(
    host: str,
    port: int,
    index: int,
    stop,
    results,
    rate: float = 0.0,
    started=None,
    prefix: str = "load",
) -> None:
    """One client's loop (in its own process): PUT a unique key, GET it back; every
    4th round also overwrites the previous round's key, every 6th deletes the key of
    two rounds before (so a check covers latest values and deletes too); at ``rate``
    requests per second if given (a missed slot is not made up)."""
    samples: list[tuple[str, float, float]] = []
    acked: dict[str, bytes] = {}
    deleted: set[str] = set()
    history: list[list] = []
    failures: list[str] = []
    reconnects = 0
    conn = _connect(host, port)
    n = 0
    interval = 2 / rate if rate > 0 else 0.0  # a PUT and a GET per round
    next_round = time.monotonic()

    def write(method: str, key: str, value: bytes | None, label: str) -> bool:
        """One write, in the history (its acknowledgement time once acknowledged) and
        the samples; False, the failure noted, if the server did not acknowledge it."""
        began = time.monotonic()
        history.append(attempt := [key, method, value, began, None])
        status, _ = _send(conn, method, f"/kv/{key}", value)
        samples.append((method, began, time.monotonic()))
        if status not in ((200, 201, 204) if method == "PUT" else (200, 204)):
            failures.append(f"{label}: HTTP {status}")
            return False
        attempt[4] = time.monotonic()
        return True

    if started is not None:
        started.release()
    while not stop.is_set():
        if interval:
            next_round = max(next_round + interval, time.monotonic() - interval)
            time.sleep(max(0.0, next_round - time.monotonic()))
        key, value = f"{prefix}{index}-{n}", f"value-{index}-{n}-{time.time_ns()}".encode()
        n += 1
        try:
            if not write("PUT", key, value, f"PUT {key}"):
                continue
            acked[key] = value
            started = time.monotonic()
            status, body = _send(conn, "GET", f"/kv/{key}", None)
            samples.append(("GET", started, time.monotonic()))
            if (status, body) != (200, value):
                failures.append(f"GET {key}: HTTP {status} {body[:40]!r}")
            if n % 4 == 0 and f"{prefix}{index}-{n - 2}" in acked:
                key = f"{prefix}{index}-{n - 2}"
                value = f"again-{index}-{n}-{time.time_ns()}".encode()
                acked.pop(key)  # unknown until acknowledged
                if not write("PUT", key, value, f"PUT {key} again"):
                    continue
                acked[key] = value
            if n % 6 == 0 and f"{prefix}{index}-{n - 3}" in acked:
                key = f"{prefix}{index}-{n - 3}"
                acked.pop(key)
                if not write("DELETE", key, None, f"DELETE {key}"):
                    continue
                deleted.add(key)
        except Exception as exc:
            failures.append(f"client {index}: {exc!r}")
            conn.close()
            time.sleep(0.05)
            conn = _connect(host, port)
            reconnects += 1
    conn.close()
    results.send((samples, acked, deleted, failures, reconnects, [tuple(h) for h in history]))


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def longest_stall_ms(samples: list[Sample]) -> float:
    """The longest time any of these requests waited."""
    return max((s.ms for s in samples), default=0.0)


def window_stalls(samples: list[Sample], window_s: float) -> list[float]:
    """The longest request (ms) touching each window of ``window_s``, the windows
    tiling the run: what a native server shows in spans the length of an upgrade,
    to hold against each upgrade's longest stall."""
    if not samples or window_s <= 0:
        return []
    begin = min(s.start for s in samples)
    count = int((max(s.end for s in samples) - begin) // window_s) + 1
    worst = [0.0] * count
    for s in samples:
        first = int((s.start - begin) // window_s)
        last = min(count - 1, int((s.end - begin) // window_s))
        for w in range(first, last + 1):
            worst[w] = max(worst[w], s.ms)
    return worst


def summarize(samples: list[Sample]) -> dict[str, float]:
    ms = [s.ms for s in samples]
    return {
        "requests": len(ms),
        "p50_ms": round(statistics.median(ms), 3) if ms else 0.0,
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(max(ms, default=0.0), 3),
    }
