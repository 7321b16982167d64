"""The control socket and `pyvmm ctl`, against a real node process."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest
from harness import GuestProcess

pytestmark = pytest.mark.kvm


def ctl(path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvmm", "ctl", str(path), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def node(kernels, tmp_path):
    path = tmp_path / "node.sock"
    args = [
        "boot",
        str(kernels / "probe.elf"),
        "--cmdline",
        "console=ttyS0 probe=spin",
        "--control",
        str(path),
        "--timeout",
        "60",
    ]
    with GuestProcess(args) as guest:
        guest.expect(r"probe: action=spin")
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield path, guest


def raw(path, payload: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_socket_is_private(node):
    path, _ = node
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_status_human_and_json(node):
    path, _ = node
    human = ctl(path, "status")
    assert human.returncode == 0
    assert "mode: devirtualized" in human.stdout and "a: running, partition 0" in human.stdout
    reply = json.loads(ctl(path, "status", "--json").stdout)
    assert reply["ok"] and reply["result"]["mode"] == "devirtualized"
    assert reply["result"]["instances"][0]["devices"] == ["com1", "vsock0"]


def test_maintenance_commands_end_to_end(node, kernels):
    path, guest = node
    assert ctl(path, "virtualize").stdout.strip() == "virtualized"
    started = ctl(
        path,
        "start",
        str(kernels / "probe.elf"),
        "--name",
        "b",
        "--cmdline",
        "probe=spin",  # no console named: pyvmm adds the partition's, ttyS1
    )
    assert started.returncode == 0, started.stderr
    assert "started b in partition 1" in started.stdout
    guest.expect(r"\[b\] probe: action=spin")
    assert ctl(path, "move", "com1", "b").returncode == 0
    status = json.loads(ctl(path, "status", "--json").stdout)["result"]
    owners = {i["name"]: i["devices"] for i in status["instances"]}
    assert owners == {"a": ["vsock0"], "b": ["com1", "com2", "vsock1"]}
    assert status["switches"] > 0 and status["switch_latency_us"]["p50"] > 0
    assert ctl(path, "stop", "b").returncode == 0
    assert ctl(path, "devirtualize").returncode == 0
    assert "mode: devirtualized" in ctl(path, "status").stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["devirtualize"], "not virtualized"),
        (["stop", "a"], "only instance"),
        (["stop", "ghost"], "no running instance"),
        (["start", "/nonexistent.elf"], "virtualize first"),
    ],
)
def test_requests_at_the_wrong_moment_are_refused(node, args, message):
    path, _ = node
    done = ctl(path, *args)
    assert done.returncode == 1
    assert message in done.stderr
    reply = json.loads(ctl(path, *args, "--json").stdout)
    assert reply["code"] == "invalid" and message in reply["error"]
    assert "mode: devirtualized" in ctl(path, "status").stdout


def test_malformed_requests_get_error_replies(node):
    path, _ = node
    replies = raw(path, b'not json\n{"op": 7}\n[1, 2]\n{"op": "stop"}\n{"op": "status"}\n')
    assert [r["ok"] for r in replies] == [False, False, False, False, True]
    assert [r.get("code") for r in replies] == ["invalid"] * 4 + [None]
    assert "not a JSON line" in replies[0]["error"]
    assert "unknown op" in replies[1]["error"]
    assert "'name' must be" in replies[3]["error"]


def test_missing_kernel_for_start_is_a_clean_error(node):
    path, _ = node
    ctl(path, "virtualize")
    done = ctl(path, "start", "/nonexistent/kernel.elf")
    assert done.returncode == 1 and "no such file" in done.stderr
    assert ctl(path, "devirtualize").returncode == 0


def test_unreachable_node(tmp_path):
    done = ctl(tmp_path / "nobody.sock", "status")
    assert done.returncode == 1 and "cannot reach the node" in done.stderr


def test_control_path_that_is_not_a_socket_is_not_replaced(kernels, tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with GuestProcess(["boot", str(kernels / "hello.elf"), "--control", str(path)]) as guest:
        status = guest.wait()
    assert status != 0 and "is not a socket" in guest.stderr
    assert path.read_text() == "keep me"


def test_status_has_a_schema_and_every_field_is_documented(node):
    from conftest import ROOT

    path, _ = node
    status = json.loads(ctl(path, "status", "--json").stdout)["result"]
    assert status["schema"] == 2
    assert status["invariant"] == [] and status["last_upgrade"] is None
    resources = status["resources"]
    assert resources["agents"] == 0 and resources["listeners"] == 0
    assert resources["threads"]["control-client"] == 1  # the asking connection
    assert resources["fds"] == sum(resources["fd_kinds"].values()) > 0
    assert resources["client_sockets"] >= 1  # the asking connection, not counted in fds
    docs = (ROOT / "docs" / "status.md").read_text()
    from pyvmm.memory import BACKINGS

    assert status["guest_ram"]["backing"] in BACKINGS and status["guest_ram"]["mib"] > 0
    nested = [status, status["instances"][0], status["service"], resources, status["isolation"]]
    nested += list(status["irq_lines"].values())
    nested.append(status["guest_ram"])
    for fields in nested:
        for field in fields:
            assert f"`{field}`" in docs, field
    # The counters are stable at quiescence: a leak would show as a difference.
    again = json.loads(ctl(path, "status", "--json").stdout)["result"]["resources"]
    assert {k: again[k] for k in ("agents", "listeners", "threads", "fds")} == {
        k: resources[k] for k in ("agents", "listeners", "threads", "fds")
    }
