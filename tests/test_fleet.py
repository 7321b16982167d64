"""The fleet playbook (examples/fleet) against local nodes: all at once, with a failure
on one node, check mode, and a second run that changes nothing."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from fleet_upgrade import ANSIBLE_ENV, FLEET, ansible_playbook, write_inventory
from online_upgrade import Node

from pyvmm.control_client import call

pytestmark = pytest.mark.kvm


@pytest.fixture(autouse=True)
def _ansible():
    try:
        import ansible  # noqa: F401
    except ImportError:
        from conftest import missing

        missing("ansible-core is not installed (pip install -e '.[fleet]')")


def fleet_upgrade(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fleet_upgrade.py"), "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_two_nodes_at_once_lose_nothing():
    report = fleet_upgrade("--nodes", "2")
    assert report["playbook_status"] == 0
    assert report["fleet"]["upgraded"] == 2 and report["fleet"]["span_s"] > 0
    for node in report["per_node"].values():
        assert node["outcome"] == "upgraded" and node["version"] == "v2", node
        assert node["failed_requests"] == 0 and node["lost_writes"] == 0, node
        assert node["acknowledged_writes"] > 0


def test_a_failure_on_one_node_rolls_that_node_back():
    report = fleet_upgrade("--nodes", "2", "--inject", "release-refused")
    assert report["playbook_status"] != 0  # a rollback is a task failure
    canary, failing = report["per_node"]["node1"], report["per_node"]["node2"]
    assert canary["outcome"] == "upgraded" and canary["version"] == "v2", canary
    assert failing["outcome"] == "rolled_back" and failing["version"] == "v1", failing
    assert failing["failed_phase"] == "release"
    assert any(line.startswith("node2: ROLLED BACK in release") for line in report["lines"])
    for node in report["per_node"].values():
        assert node["failed_requests"] == 0 and node["lost_writes"] == 0, node


def adhoc(module_args: str, *extra: str) -> dict:
    """online_upgrade as an ad-hoc command on localhost; its result."""
    done = subprocess.run(
        [
            ansible_playbook().replace("ansible-playbook", "ansible"),
            "localhost",
            "-m",
            "pyvmm.maintenance.online_upgrade",
            "-a",
            module_args,
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**ANSIBLE_ENV, "ANSIBLE_COLLECTIONS_PATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    # The ad-hoc output: "localhost | CHANGED => {...result...}"
    return json.loads(done.stdout.partition(" => ")[2])


def test_check_mode_changes_nothing_and_a_second_run_reports_no_change(tmp_path, kernels):
    hosts = ["node1", "node2"]
    nodes = []
    try:
        for host in hosts:
            (tmp_path / host).mkdir()
            nodes.append(Node(str(tmp_path / host)))
        inventory = write_inventory(tmp_path, hosts, None)

        def play(*extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
            command = [ansible_playbook(), "-i", str(inventory), str(FLEET / "upgrade.yml")]
            report = tmp_path / "report.json"
            done = subprocess.run(
                [*command, "-e", f"pyvmm_report={report}", *extra],
                capture_output=True,
                text=True,
                env=ANSIBLE_ENV,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
            return done, json.loads(report.read_text())

        def shape() -> list:
            return [
                [(i["name"], i["status"], i["kernel_sha256"]) for i in s["instances"]] + [s["mode"]]
                for s in (call(n.control, "status") for n in nodes)
            ]

        before = shape()
        _, report = play("--check")
        assert [n["outcome"] for n in report["nodes"].values()] == ["would_upgrade"] * 2
        assert shape() == before  # check mode changed nothing

        _, report = play()
        assert [n["outcome"] for n in report["nodes"].values()] == ["upgraded"] * 2
        v2 = hashlib.sha256((kernels / "webkv-v2.elf").read_bytes()).hexdigest()
        for status in shape():
            serving = [i for i in status[:-1] if i[1] == "running"]
            assert [i[2] for i in serving] == [v2] and status[-1] == "devirtualized"

        done, report = play()
        assert [n["outcome"] for n in report["nodes"].values()] == ["unchanged"] * 2
        for host in hosts:
            assert re.search(rf"^{host}\s+: ok=\d+\s+changed=0\s", done.stdout, re.M), done.stdout

        # src: the controller copies the kernel to the node first (check mode: a staged
        # copy is preflighted and the node's file is not written).
        dest = tmp_path / "kernels" / "webkv-v1.elf"
        dest.parent.mkdir()
        args = f"control_socket={nodes[0].control} kernel={dest} src={kernels / 'webkv-v1.elf'}"
        checked = adhoc(args, "--check")
        assert checked["changed"] and checked["preflight"]["ready"], checked
        assert (
            checked["kernel_sha256"]
            == hashlib.sha256((kernels / "webkv-v1.elf").read_bytes()).hexdigest()
        )
        assert not dest.exists() and shape()[0][-2][2] == v2
        upgraded = adhoc(args)
        assert upgraded["changed"] and upgraded["kernel_copied"], upgraded
        assert upgraded["report"]["after"] == "v1"
        assert dest.read_bytes() == (kernels / "webkv-v1.elf").read_bytes()
    finally:
        for node in nodes:
            node.__exit__()
