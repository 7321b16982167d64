"""The lean control client: what it imports, and how it meets a misbehaving node (no
KVM: the node is a socket that answers from a script)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest

from pyvmm import control_client
from pyvmm.control_client import ControlError, OperationFailed, call, request


def test_client_and_commands_import_nothing_heavy():
    probe = (
        "import sys, pyvmm.control_client, pyvmm.ctl, pyvmm.launcher\n"
        "heavy = [m for m in sys.modules if m.startswith(('pyvmm.microvisor', 'pyvmm.kvm',"
        " 'pyvmm.machine', 'ioctl', 'numpy', 'typer', 'click', 'elftools'))]\n"
        "print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.fixture
def node(tmp_path):
    """A node that answers every request with the lines given to ``answer``."""
    path = str(tmp_path / "node.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)
    script: list[bytes] = []
    seen: list[dict] = []

    def serve() -> None:
        while True:
            try:
                conn, _address = server.accept()
            except OSError:
                return
            with conn:
                seen.append(json.loads(conn.makefile("rb").readline()))
                for line in script:
                    conn.sendall(line)

    threading.Thread(target=serve, daemon=True).start()

    def answer(*lines: bytes) -> tuple[str, list[dict]]:
        script[:] = lines
        return path, seen

    yield answer
    server.close()


def test_progress_lines_then_the_reply(node):
    path, seen = node(b'{"progress": {"phase": "boot"}}\n', b'{"ok": true, "result": 7}\n')
    updates: list[dict] = []
    reply = request(path, "upgrade", on_progress=updates.append, kernel="k")
    assert reply == {"ok": True, "result": 7}
    assert updates == [{"phase": "boot"}]
    assert seen == [{"op": "upgrade", "kernel": "k"}]


def test_an_error_reply_raises_operation_failed(node):
    path, _ = node(b'{"ok": false, "error": "busy: upgrade is already running"}\n')
    with pytest.raises(OperationFailed, match="busy: upgrade"):
        call(path, "stop", name="a")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ((b"not json\n",), "not JSON"),
        ((b"[1, 2]\n",), "sent list, not an object"),
        ((), "closed the connection"),
    ],
)
def test_a_node_that_breaks_the_protocol(node, lines, message):
    path, _ = node(*lines)
    with pytest.raises(ControlError, match=message):
        request(path, "status")


def test_a_node_that_never_answers_times_out(tmp_path):
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(path)
        silent.listen(1)
        with pytest.raises(ControlError, match=r"did not answer within 0\.2 s"):
            request(path, "status", timeout=0.2)


def test_an_unreachable_node(tmp_path):
    with pytest.raises(ControlError, match="cannot reach the node"):
        request(str(tmp_path / "absent.sock"), "status")


def test_the_reply_wait_covers_the_phase_timeouts():
    assert control_client.reply_timeout(None) == control_client.DEFAULT_TIMEOUT_S
    assert control_client.reply_timeout({"acquire": 300.0}) > 300.0
