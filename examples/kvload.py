"""A webkv load generator: keep-alive HTTP clients that write unique keys and read
them back, recording every request's latency and every acknowledged write.

Each client keeps one connection for its whole run and never re-sends a request:
an error status, a wrong value, a closed, reset or refused connection or a time-out
counts as a failed request (and the client then opens a new connection). So a run
with no failures also shows that no keep-alive connection was lost in a hand-off.
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time


class Sample:
    __slots__ = ("end", "method", "ms", "start")

    def __init__(self, method: str, start: float, end: float) -> None:
        self.method, self.start, self.end = method, start, end
        self.ms = (end - start) * 1000


class KvLoad:
    def __init__(self, port: int, clients: int = 8, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, bytes] = {}
        self.failures: list[str] = []
        self.samples: list[Sample] = []
        self.reconnects = 0
        self.threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def start(self) -> KvLoad:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(60)

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30)

    @staticmethod
    def _send(conn, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()

    def _client(self, index: int) -> None:
        conn = self._connect()
        n = 0
        while not self.stop_event.is_set():
            key, value = f"load{index}-{n}", f"value-{index}-{n}-{time.time_ns()}".encode()
            try:
                started = time.monotonic()
                status, _ = self._send(conn, "PUT", f"/kv/{key}", value)
                self._record("PUT", started)
                if status not in (200, 201, 204):
                    self._fail(f"PUT {key}: HTTP {status}")
                    continue
                with self.lock:
                    self.acked[key] = value
                started = time.monotonic()
                status, body = self._send(conn, "GET", f"/kv/{key}", None)
                self._record("GET", started)
                if (status, body) != (200, value):
                    self._fail(f"GET {key}: HTTP {status} {body[:40]!r}")
            except Exception as exc:
                self._fail(f"client {index}: {exc!r}")
                conn.close()
                time.sleep(0.05)
                conn = self._connect()
                with self.lock:
                    self.reconnects += 1
            n += 1
        conn.close()

    def _record(self, method: str, started: float) -> None:
        sample = Sample(method, started, time.monotonic())
        with self.lock:
            self.samples.append(sample)

    def _fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)

    def lost_writes(self) -> list[str]:
        """Acknowledged writes that the service no longer returns."""
        lost = []
        conn = self._connect()
        for key, value in list(self.acked.items()):
            status, body = self._send(conn, "GET", f"/kv/{key}", None)
            if (status, body) != (200, value):
                lost.append(key)
        conn.close()
        return lost


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def longest_stall_ms(samples: list[Sample]) -> float:
    """The longest time any request waited: what a client saw of the hand-off."""
    return max((s.ms for s in samples), default=0.0)


def summarize(samples: list[Sample]) -> dict[str, float]:
    ms = [s.ms for s in samples]
    return {
        "requests": len(ms),
        "p50_ms": round(statistics.median(ms), 3) if ms else 0.0,
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(max(ms, default=0.0), 3),
    }
