"""The preflight control op (checks, changes nothing) and what ``status`` says each
instance runs: its kernel's content hash and its command line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from test_upgrade import Node, control_request, upgrade_held_in_acquire

from pyvmm.control_client import call

pytestmark = pytest.mark.kvm


@pytest.fixture
def node(kernels, tmp_path):
    n = Node(kernels, tmp_path)
    yield n
    n.guest.kill()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shape(node) -> dict:
    """What a preflight must not change."""
    status = call(node.control, "status")
    return {
        "mode": status["mode"],
        "instances": [(i["name"], i["status"], i["devices"]) for i in status["instances"]],
        "version": json.loads(node.get("/status")[1])["version"],
    }


def test_status_reports_kernel_hash_and_command_line(node, kernels):
    (a,) = call(node.control, "status")["instances"]
    assert a["kernel"] == str(kernels / "webkv-v1.elf")
    assert a["kernel_sha256"] == sha256(kernels / "webkv-v1.elf")
    assert a["cmdline"] == "console=ttyS0"
    assert a["service_cmdline"] == ""


def test_preflight_checks_and_changes_nothing(node, kernels, tmp_path):
    before = shape(node)
    v2 = call(node.control, "preflight", kernel=str(kernels / "webkv-v2.elf"))
    assert v2["ready"] and v2["problems"] == [] and not v2["up_to_date"], v2
    assert v2["kernel_sha256"] == sha256(kernels / "webkv-v2.elf")
    assert v2["serving"] == "a" and v2["spare_partition"] == 1
    # The kernel the node runs, same (empty) operator command line: nothing to do.
    v1 = call(node.control, "preflight", kernel=str(kernels / "webkv-v1.elf"))
    assert v1["ready"] and v1["up_to_date"], v1
    assert not call(node.control, "preflight", kernel=str(kernels / "webkv-v1.elf"), cmdline="x=1")[
        "up_to_date"
    ]
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"not an ELF file")
    bad = call(node.control, "preflight", kernel=str(junk))
    assert not bad["ready"] and "not an ELF file" in bad["problems"][0], bad
    missing = call(node.control, "preflight", kernel=str(tmp_path / "absent.elf"))
    assert not missing["ready"] and "no such file" in missing["problems"][0]
    assert missing["kernel_sha256"] is None and not missing["up_to_date"]
    reply = control_request(node, "preflight", kernel=str(kernels / "webkv-v2.elf"), cmdline=5)
    assert not reply["ok"] and "'cmdline' must be a string" in reply["error"]
    assert shape(node) == before


def test_preflight_refuses_a_virtualized_node(node, kernels):
    call(node.control, "virtualize")
    result = call(node.control, "preflight", kernel=str(kernels / "webkv-v2.elf"))
    assert not result["ready"] and "virtualized" in result["problems"][0], result
    call(node.control, "devirtualize")
    assert call(node.control, "preflight", kernel=str(kernels / "webkv-v2.elf"))["ready"]


def test_preflight_refuses_a_busy_node(node, kernels):
    with upgrade_held_in_acquire(node.control, kernels / "webkv-v2.elf"):
        result = call(node.control, "preflight", kernel=str(kernels / "webkv-v2.elf"))
        assert not result["ready"], result
        assert result["problems"][0] == "the node is busy: upgrade is running"
    assert call(node.control, "preflight", kernel=str(kernels / "webkv-v2.elf"))["ready"]


def test_after_an_upgrade_status_and_preflight_see_the_new_kernel(node, kernels):
    status, report = node.upgrade("v2", "--cmdline", "x=1  y=2")
    assert status == 0, report
    serving = next(i for i in call(node.control, "status")["instances"] if i["status"] == "running")
    assert serving["kernel_sha256"] == sha256(kernels / "webkv-v2.elf")
    assert serving["service_cmdline"] == "x=1 y=2"
    assert "role=standby" in serving["cmdline"]
    kernel = str(kernels / "webkv-v2.elf")
    assert call(node.control, "preflight", kernel=kernel, cmdline="x=1 y=2")["up_to_date"]
    assert not call(node.control, "preflight", kernel=kernel)["up_to_date"]


def test_ctl_preflight_command(node, kernels, tmp_path):
    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pyvmm", "ctl", node.control, "preflight", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    ok = ctl(str(kernels / "webkv-v2.elf"))
    assert ok.returncode == 0 and ok.stdout.startswith("ready"), ok
    absent = ctl(str(tmp_path / "absent.elf"), "--json")
    assert absent.returncode == 1
    assert json.loads(absent.stdout)["result"]["ready"] is False
