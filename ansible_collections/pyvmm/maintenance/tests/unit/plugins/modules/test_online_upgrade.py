"""online_upgrade and node_info without KVM: each module runs as Ansible runs it (its
own process, arguments from a JSON file) against a fake node, a Unix socket that
answers the control protocol from a script and records every request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

COLLECTION = Path(__file__).resolve().parents[4]
MODULES = COLLECTION / "plugins" / "modules"
# The folder that holds ansible_collections/: modules import their module_utils from it.
COLLECTIONS_ROOT = COLLECTION.parents[2]
KERNEL = "/srv/kernels/webkv-v2.elf"

READY = {
    "ready": True,
    "problems": [],
    "kernel": KERNEL,
    "kernel_sha256": "ab" * 32,
    "cmdline": "",
    "spare_partition": 1,
    "serving": "a",
    "up_to_date": False,
}
UPGRADED = {
    "ok": True,
    "before": "v1",
    "after": "v2",
    "instance": "b",
    "total_s": 0.05,
    "monotonic_start": 100.0,
    "phases": [{"phase": "preflight", "state": "done", "start": 0.0, "seconds": 0.001}],
}
ROLLED_BACK = {
    "ok": False,
    "rolled_back": True,
    "failed_phase": "acquire",
    "reason": "the new instance never reported serving",
    "before": "v1",
    "after": "v1",
    "total_s": 2.5,
    "monotonic_start": 100.0,
    "phases": [],
}


class FakeNode:
    """A control socket that answers each op with ``replies[op]`` (a reply object, or
    a list of lines to send: progress lines, then the reply)."""

    def __init__(self, path: Path, replies: dict[str, object]) -> None:
        self.path = str(path)
        self.replies = replies
        self.requests: list[dict] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _address = self._sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as reader:
                for line in reader:
                    request = json.loads(line)
                    self.requests.append(request)
                    reply = self.replies.get(request["op"], {"ok": False, "error": "unknown op"})
                    for message in reply if isinstance(reply, list) else [reply]:
                        conn.sendall(json.dumps(message).encode() + b"\n")

    @property
    def ops(self) -> list[str]:
        return [r["op"] for r in self.requests]

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def fake_node(tmp_path):
    nodes: list[FakeNode] = []

    def make(**replies: object) -> FakeNode:
        node = FakeNode(tmp_path / f"node{len(nodes)}.sock", replies)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.close()


def run_module(
    tmp_path: Path, name: str, args: dict, check_mode: bool = False, pythonpath: str = ""
) -> dict:
    """Runs the module the way Ansible's module runner does; returns its JSON result."""
    args_file = tmp_path / "args.json"
    module_args = {**args, "_ansible_check_mode": check_mode}
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": module_args}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(COLLECTIONS_ROOT)) if p),
        "LC_ALL": "C.UTF-8",
    }
    done = subprocess.run(
        [sys.executable, str(MODULES / f"{name}.py"), str(args_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
        check=False,  # a failed task exits non-zero; its JSON result is what counts
    )
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"no JSON result: {done.stdout!r} {done.stderr!r}") from None


def upgrade_args(node: FakeNode, **extra: object) -> dict:
    return {"control_socket": node.path, "kernel": KERNEL, **extra}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"kernel": KERNEL}, "missing required arguments: control_socket"),
        ({"control_socket": "/x.sock"}, "missing required arguments: kernel"),
        ({"control_socket": "/x.sock", "kernel": KERNEL, "when": "now"}, "Unsupported parameters"),
        ({"control_socket": "/x.sock", "kernel": KERNEL, "inject": "meteor"}, "value of inject"),
        ({"control_socket": "/x.sock", "kernel": KERNEL, "timeouts": {"acquire": "soon"}}, "float"),
        ({"control_socket": "/x.sock", "kernel": KERNEL, "timeouts": {"lunch": 1}}, "lunch"),
        ({"control_socket": "/x.sock", "kernel": KERNEL, "timeouts": {"acquire": -1}}, "positive"),
        ({"control_socket": "/x.sock", "kernel": "webkv-v2.elf"}, "absolute path"),
    ],
)
def test_bad_arguments_fail_before_any_request(tmp_path, fake_node, args, message):
    node = fake_node(preflight={"ok": True, "result": READY})
    if args.get("control_socket") == "/x.sock":
        args = {**args, "control_socket": node.path}
    result = run_module(tmp_path, "online_upgrade", args)
    assert result["failed"] and message in result["msg"], result
    assert node.ops == []


def test_check_mode_runs_the_preflight_only(tmp_path, fake_node):
    node = fake_node(preflight={"ok": True, "result": READY})
    result = run_module(tmp_path, "online_upgrade", upgrade_args(node), check_mode=True)
    assert result["changed"] and not result.get("failed"), result
    assert result["preflight"] == READY and "report" not in result
    assert node.ops == ["preflight"]


def test_check_mode_fails_when_the_upgrade_could_not_start(tmp_path, fake_node):
    problems = ["the node is virtualized: maintenance is under way", "kernel too big"]
    node = fake_node(
        preflight={"ok": True, "result": {**READY, "ready": False, "problems": problems}}
    )
    result = run_module(tmp_path, "online_upgrade", upgrade_args(node), check_mode=True)
    assert result["failed"] and not result["changed"]
    assert result["msg"] == "preflight: " + "; ".join(problems)
    assert node.ops == ["preflight"]


@pytest.mark.parametrize("check_mode", [False, True])
def test_a_node_that_runs_the_kernel_already_is_left_alone(tmp_path, fake_node, check_mode):
    node = fake_node(preflight={"ok": True, "result": {**READY, "up_to_date": True}})
    result = run_module(
        tmp_path, "online_upgrade", upgrade_args(node, cmdline="x=1"), check_mode=check_mode
    )
    assert result["changed"] is False and not result.get("failed"), result
    assert node.ops == ["preflight"]
    assert node.requests[0] == {"op": "preflight", "kernel": KERNEL, "cmdline": "x=1"}


def test_upgrade_returns_the_report(tmp_path, fake_node):
    progress = {"progress": {"phase": "boot", "state": "done", "seconds": 0.01}}
    node = fake_node(
        preflight={"ok": True, "result": READY},
        upgrade=[progress, progress, {"ok": True, "result": UPGRADED}],
    )
    args = upgrade_args(node, cmdline="a=b", timeouts={"acquire": 3})
    result = run_module(tmp_path, "online_upgrade", args)
    assert result["changed"] and not result.get("failed"), result
    assert result["report"] == UPGRADED and result["rolled_back"] is False
    assert result["kernel_sha256"] == READY["kernel_sha256"]
    assert result["msg"] == "upgraded v1 -> v2 in 50 ms"
    assert node.requests[1] == {
        "op": "upgrade",
        "kernel": KERNEL,
        "cmdline": "a=b",
        "timeouts": {"acquire": 3.0},  # only the phases given
    }


def test_a_rollback_is_a_task_failure_with_the_report(tmp_path, fake_node):
    node = fake_node(
        preflight={"ok": True, "result": READY},
        upgrade={"ok": True, "result": ROLLED_BACK},
    )
    result = run_module(tmp_path, "online_upgrade", upgrade_args(node, inject="never-serving"))
    assert result["failed"] and result["changed"] is False, result
    assert result["rolled_back"] and result["report"] == ROLLED_BACK
    assert "rolled back in acquire: the new instance never reported serving" in result["msg"]
    assert node.requests[1]["inject"] == "never-serving"


def test_an_error_reply_is_a_task_failure(tmp_path, fake_node):
    node = fake_node(
        preflight={"ok": True, "result": READY},
        upgrade={"ok": False, "error": "an upgrade is already running on this node"},
    )
    result = run_module(tmp_path, "online_upgrade", upgrade_args(node))
    assert result["failed"]
    assert result["msg"] == "upgrade: an upgrade is already running on this node"


def test_an_unreachable_node_is_a_task_failure(tmp_path):
    args = {"control_socket": str(tmp_path / "absent.sock"), "kernel": KERNEL}
    result = run_module(tmp_path, "online_upgrade", args)
    assert result["failed"] and "cannot reach the node" in result["msg"], result


def test_without_pyvmm_the_module_says_what_is_missing(tmp_path, fake_node):
    shadow = tmp_path / "shadow" / "pyvmm"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no pyvmm on this node')\n")
    node = fake_node(preflight={"ok": True, "result": READY})
    result = run_module(
        tmp_path, "online_upgrade", upgrade_args(node), pythonpath=str(shadow.parent)
    )
    assert (
        result["failed"] and "Failed to import the required Python library (pyvmm)" in result["msg"]
    ), result
    assert node.ops == []


def test_node_info_returns_the_status(tmp_path, fake_node):
    a = {"name": "a", "status": "retired", "kernel_sha256": "11" * 32}
    b = {"name": "b", "status": "running", "kernel_sha256": "22" * 32}
    status = {"mode": "devirtualized", "current": "b", "instances": [a, b]}
    node = fake_node(status={"ok": True, "result": status})
    for check_mode in (False, True):
        result = run_module(
            tmp_path, "node_info", {"control_socket": node.path}, check_mode=check_mode
        )
        assert result["changed"] is False and result["status"] == status, result
        assert result["serving"] == b
    assert node.ops == ["status", "status"]
