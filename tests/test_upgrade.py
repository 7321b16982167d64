"""Online upgrade of a live webkv node: hand-off, rollback, repetition, under load."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from harness import GuestProcess

pytestmark = pytest.mark.kvm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, kernels, tmp_path) -> None:
        self.kernels = kernels
        self.control = str(tmp_path / "node.sock")
        disk = tmp_path / "kv.img"
        with open(disk, "wb") as f:
            f.truncate(32 << 20)
        self.port = free_port()
        self.guest = GuestProcess(
            [
                "boot",
                str(kernels / "webkv-v1.elf"),
                "--disk",
                str(disk),
                "--forward",
                f"127.0.0.1:{self.port}=80",
                "--control",
                self.control,
                "--timeout",
                "600",
            ]
        )
        self.guest.expect(r"webkv: ready", timeout=30)

    def upgrade(self, version: str, *extra: str) -> tuple[int, dict]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pyvmm",
                "upgrade",
                self.control,
                "--to",
                str(self.kernels / f"webkv-{version}.elf"),
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.returncode, json.loads(done.stdout.splitlines()[-1])

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()


@pytest.fixture
def node(kernels, tmp_path):
    n = Node(kernels, tmp_path)
    yield n
    n.guest.kill()


class Load:
    """Keep-alive clients writing unique keys and reading them back. A request on a
    connection the server closed before answering is retried on a new connection, as
    HTTP allows for idempotent methods; anything else is a failure."""

    def __init__(self, port: int, clients: int = 8) -> None:
        self.port = port
        self.stop = threading.Event()
        self.acked: dict[str, bytes] = {}
        self.failures: list[str] = []
        self.longest_ms = 0.0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _send(self, conn, method: str, path: str, body: bytes | None):
        for _ in range(5):
            try:
                conn.request(method, path, body=body)
                r = conn.getresponse()
                return conn, r.status, r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        raise ConnectionError(f"{method} {path}: no answer after retries")

    def _client(self, index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        n = 0
        while not self.stop.is_set():
            key, value = f"c{index}-{n}", f"value-{index}-{n}".encode()
            started = time.monotonic()
            try:
                conn, status, _ = self._send(conn, "PUT", f"/kv/{key}", value)
                if status not in (201, 204):
                    self.failures.append(f"PUT {key}: {status}")
                else:
                    with self.lock:
                        self.acked[key] = value
                conn, status, body = self._send(conn, "GET", f"/kv/{key}", None)
                if (status, body) != (200, value):
                    self.failures.append(f"GET {key}: {status} {body[:40]!r}")
            except Exception as exc:
                self.failures.append(f"client {index}: {exc!r}")
                return
            self.longest_ms = max(self.longest_ms, (time.monotonic() - started) * 1000)
            n += 1
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_upgrade_under_load_loses_nothing(node):
    load = Load(node.port)
    time.sleep(0.5)
    status, report = node.upgrade("v2")
    time.sleep(0.5)
    load.finish()
    assert status == 0 and report["ok"] and report["result"]["after"] == "v2", report
    assert not load.failures, load.failures[:5]
    assert len(load.acked) > 50
    for key, value in load.acked.items():  # every acknowledged write survived
        assert node.get(f"/kv/{key}") == (200, value), key
    assert json.loads(node.get("/status")[1])["version"] == "v2"


@pytest.mark.parametrize(
    "fault",
    ["boot-fails", "crash-after-ready", "never-serving", "release-refused", "phase-timeout"],
)
def test_every_injected_fault_rolls_back(node, fault):
    load = Load(node.port, clients=4)
    time.sleep(0.3)
    status, report = node.upgrade("v2", "--inject", fault)
    time.sleep(0.3)
    load.finish()
    assert status == 3, report
    result = report["result"]
    assert result["rolled_back"] and result["after"] == "v1", result
    assert not load.failures, load.failures[:5]
    for key, value in list(load.acked.items())[:200]:
        assert node.get(f"/kv/{key}") == (200, value)
    info = json.loads(node.get("/status")[1])
    assert info["version"] == "v1" and info["role"] == "primary"


def test_four_consecutive_upgrades_alternate_partitions(node):
    conn_status = node.get("/status")[0]
    assert conn_status == 200
    for i, version in enumerate(["v2", "v1", "v2", "v1"]):
        node_put = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
        node_put.request("PUT", f"/kv/round{i}", body=version.encode())
        assert node_put.getresponse().status == 201
        node_put.close()
        status, report = node.upgrade(version)
        assert status == 0 and report["result"]["after"] == version, report
    for i, version in enumerate(["v2", "v1", "v2", "v1"]):
        assert node.get(f"/kv/round{i}") == (200, version.encode())


def test_a_second_upgrade_at_the_same_time_is_refused(node):
    results: list[tuple[int, dict]] = []
    threads = [
        threading.Thread(target=lambda: results.append(node.upgrade("v2"))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(ok) == 1 and len(refused) == 1
    assert "already running" in refused[0][1]["error"]
