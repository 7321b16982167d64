"""Online upgrade of a live webkv node: hand-off, rollback, repetition, under load."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import GuestProcess
from kvload import KvLoad

pytestmark = pytest.mark.kvm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, kernels, tmp_path) -> None:
        self.kernels = kernels
        self.control = str(tmp_path / "node.sock")
        self.disk = disk = tmp_path / "kv.img"
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

    def lost_on_disk(self, load: KvLoad) -> list[str]:
        """SIGKILL the node, then look for every write ``load`` had acknowledged on the
        disk image, with the guest's own recovery rules."""
        self.guest.kill()
        return load.lost_on_disk(str(self.disk))

    def keep_alive(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

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


LEAK_COUNTERS = ("agents", "listeners", "threads", "fds")
# A device's worker thread starts when a driver first activates it and lives as long
# as the device: one per device at most, not one per upgrade.
DEVICE_THREADS = {"virtio-blk": 2, "virtio-vsock": 2}


def node_status(node) -> dict:
    reply = control_request(node, "status")
    assert reply["ok"], reply
    return reply["result"]


def leak_counters(node) -> dict:
    resources = node_status(node)["resources"]
    return {k: resources[k] for k in LEAK_COUNTERS}


def assert_known_state(node, before: dict, instance: str, outcome: str) -> dict:
    """The invariant after an upgrade: one instance serving with the listener and the
    disk lease, devirtualized, no agent or listener open, and no thread or fd more
    than before (polled a moment: the upgrade's control connection may be closing)."""
    deadline = time.monotonic() + 5
    before = dict(before, threads=without_device_threads(before["threads"]))
    while True:
        status = node_status(node)
        now = {k: status["resources"][k] for k in LEAK_COUNTERS}
        threads = now["threads"]
        assert all(threads.get(name, 0) <= most for name, most in DEVICE_THREADS.items())
        now["threads"] = without_device_threads(threads)
        if now == before or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status["invariant"] == [], status
    assert status["mode"] == "devirtualized" and status["virtualized_reason"] is None
    running = [i for i in status["instances"] if i["status"] == "running"]
    assert [i["name"] for i in running] == [instance], status["instances"]
    partition = running[0]["partition"]
    assert status["service"]["serving"] == instance
    assert status["service"]["disk_writer"] == partition
    assert {listener["partition"] for listener in status["service"]["listeners"]} == {partition}
    assert now == before, f"before {before} after {now}"
    assert status["last_upgrade"]["outcome"] == outcome, status["last_upgrade"]
    return status


def assert_interrupts_routed(status: dict) -> None:
    """With back-end processes (PYVMM_DEVICE_BACKENDS=process), the service devices'
    interrupts went through the microvisor while virtualized: B's disk and vsock
    interrupted it then, through the poller; the processes count every call."""
    lines = {line["device"]: line for line in status["irq_lines"].values()}
    if not status["device_backends"]:
        assert all(line["routed_calls"] == 0 for line in lines.values())
        assert all(line["backend_calls"] is None for line in lines.values())
        return
    for device in ("blk1", "vsock1"):
        line = lines[device]
        assert 0 < line["routed_calls"] <= line["raised"], (device, line)
        assert line["routed_calls"] <= line["backend_calls"], (device, line)
        assert line["injected"] + line["held"] + line["dropped"] >= line["routed_calls"]


def without_device_threads(threads: dict) -> dict:
    return {name: count for name, count in threads.items() if name not in DEVICE_THREADS}


def status_on(conn: http.client.HTTPConnection) -> dict:
    conn.request("GET", "/status")
    response = conn.getresponse()
    assert response.status == 200
    return json.loads(response.read())


HANDOFF_STEPS = (
    "vCPU to A alone",
    "listeners detached; release asked",
    "A released",
    "vCPU to B alone (posted)",
    "disk lease moved",
    "listeners attached; acquire asked",
    "B serving",
)


def steps_at(trace: list, step: str) -> float:
    return next(ms for ms, what, _ in trace if what == step)


def test_upgrade_under_load_loses_nothing(node):
    before = leak_counters(node)
    load = KvLoad(node.port).start()
    time.sleep(0.5)
    status, report = node.upgrade("v2")
    time.sleep(0.5)
    load.stop()
    assert status == 0 and report["ok"] and report["result"]["after"] == "v2", report
    after = assert_known_state(node, before, "b", "upgraded")
    assert after["last_upgrade"]["report"]["after"] == "v2"
    assert not load.failures, load.failures[:5]  # no request failed, none was re-sent
    assert load.reconnects == 0
    assert_interrupts_routed(after)
    assert len(load.acked) > 50
    assert load.lost_writes() == []  # every acknowledged write survived
    # B read the log ahead as a standby and replayed only the rest when it acquired.
    following = node.guest.expect(r"^\[b\] webkv: following records=(\d+)", timeout=5)
    recovered = node.guest.expect(
        r"^\[b\] webkv: recovered records=(\d+) .* continued=1 ", timeout=5
    )
    assert 0 < int(following[1]) <= int(recovered[1])
    # The hand-off in the report's trace: its steps in order, and one world switch (to
    # B) from the release to B serving: A released alone on the vCPU, B acquired alone.
    trace = report["result"]["trace"]
    steps = [what for _, what, _ in trace if what in HANDOFF_STEPS]
    assert steps == list(HANDOFF_STEPS), trace
    asked = steps_at(trace, "listeners detached; release asked")
    serving = steps_at(trace, "B serving")
    switches = [d for ms, what, d in trace if what == "switch" and asked <= ms <= serving]
    assert len(switches) == 1 and switches[0].startswith("to b "), trace
    assert json.loads(node.get("/status")[1])["version"] == "v2"
    assert node.lost_on_disk(load) == [] and load.writes > 50
    assert load.deleted and len(load.acked) > 50  # deletes and overwrites were checked too
    # The check can fail: a value never written, a delete that did not happen.
    key = next(iter(load.acked))
    load.acked[key] = b"never written"
    load.deleted.add(next(iter(k for k in load.acked if k != key)))
    assert len(node.lost_on_disk(load)) == 2


# fault: (the phase that fails, words of the reason, the console prefix of the webkv that
# misbehaves: A, the first instance, has the node's console to itself, B's lines say [b];
# None: a host-side fault), the guest's own name for it, extra time-outs)
FAULTS = {
    "boot-fails": ("boot", "", None, None, ()),
    "crash-after-ready": ("release", "gone", None, None, ()),
    # B boots with fault=never-serving: its agent never answers acquire, and the
    # acquire time-out (short here) rolls back.
    "never-serving": ("acquire", "never reported serving", r"\[b\] ", "never-serving", ()),
    # A's agent, armed just before the release, refuses it and serves on.
    "release-refused": (
        "release",
        "refused to release: fault-injected",
        "",
        "release-refused",
        (),
    ),
    "phase-timeout": ("acquire", "never reported serving", None, None, ()),  # a tiny time-out
    # A's agent never answers the release: its time-out expires, and A, asked on a fresh
    # connection, takes the service back.
    "release-timeout": ("release", "no reply to 'release'", "", "release-hang", ("release=1",)),
    # A begins releasing and drops its agent connection: it finishes releasing, then
    # re-acquires (answering "error releasing" until it can).
    "release-closed": ("release", "closed the connection", "", "release-close", ()),
    # B triple-faults when asked to acquire: the wait ends when it is gone.
    "crash-during-acquire": ("acquire", "gone", r"\[b\] ", "crash-on-acquire", ()),
    # Every I/O of B's disk front-end fails during acquire: B cannot mount the log.
    "disk-eio": ("acquire", "answered 'error", None, None, ()),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_injected_fault_rolls_back(node, fault):
    phase, reason, guest, guest_fault, timeouts = FAULTS[fault]
    idle = node.keep_alive()
    assert status_on(idle)["version"] == "v1"
    before = leak_counters(node)
    load = KvLoad(node.port, clients=4).start()
    time.sleep(0.3)
    extra = [arg for t in ("acquire=2", *timeouts) for arg in ("--timeout", t)]
    status, report = node.upgrade("v2", "--inject", fault, *extra)
    time.sleep(0.3)
    load.stop()
    assert status == 3, report
    result = report["result"]
    assert result["rolled_back"] and result["after"] == "v1", result
    assert result["failed_phase"] == phase and reason in result["reason"], result
    assert result["invariant"] == [] and "trouble" not in result, result
    assert not load.failures, load.failures[:5]
    assert load.reconnects == 0
    assert len(load.acked) > 0
    assert load.lost_writes() == []
    info = status_on(idle)  # the idle keep-alive connection is served by A again
    assert (info["version"], info["role"], info["instance"]) == ("v1", "primary", "webkv")
    last = assert_known_state(node, before, "a", "rolled_back")["last_upgrade"]
    assert (last["phase"], last["reason"]) == (phase, result["reason"])
    if guest is not None:  # the guest itself misbehaved, and said so on its console
        node.guest.expect(rf"^{guest}webkv: fault-armed={guest_fault}$", timeout=5)
        node.guest.expect(rf"^{guest}webkv: fault={guest_fault}$", timeout=5)
    else:
        assert "webkv: fault" not in node.guest.stdout
    # Nothing stays armed (a fault fires once): the next upgrade goes through.
    status, report = node.upgrade("v2")
    assert status == 0 and report["result"]["after"] == "v2", report
    after = status_on(idle)
    assert (after["version"], after["keys"]) == ("v2", info["keys"])
    assert node.lost_on_disk(load) == []  # every acknowledged write, on the disk


# Faults after the commit point: B serves, and the upgrade rolls forward.
LATE_FAULTS = {
    # B answers serving, then closes its agent connection: nothing needs it any more.
    "agent-dies-after-serving": ("upgraded", None),
    # Stopping A raises inside the VMM once: retried.
    "retire-fails": ("upgraded", "retire (try 1): InjectedFault: injected fault: stop"),
    # devirtualize raises on every try: left virtualized, with the reason in status,
    # and `pyvmm ctl devirtualize` finishes it.
    "devirtualize-fails": (
        "rolled_forward",
        "devirtualize (try 3): InjectedFault: injected fault: devirtualize",
    ),
}


@pytest.mark.parametrize("fault", list(LATE_FAULTS))
def test_a_failure_after_the_commit_rolls_forward(node, fault):
    outcome, trouble = LATE_FAULTS[fault]
    idle = node.keep_alive()
    assert status_on(idle)["version"] == "v1"
    before = leak_counters(node)
    load = KvLoad(node.port, clients=4).start()
    time.sleep(0.3)
    status, report = node.upgrade("v2", "--inject", fault)
    time.sleep(0.3)
    load.stop()
    result = report["result"]
    assert status == 0 and result["ok"] and result["after"] == "v2", report
    assert result["outcome"] == outcome and result["invariant"] == [], result
    if trouble is None:
        assert "trouble" not in result, result
    else:
        assert any(trouble in line for line in result.get("trouble", [])), json.dumps(result)
    assert not load.failures, load.failures[:5]
    assert load.reconnects == 0 and len(load.acked) > 0
    assert load.lost_writes() == []
    assert status_on(idle)["version"] == "v2"  # B serves the same keep-alive connection
    if outcome == "rolled_forward":
        left = node_status(node)
        assert left["mode"] == "virtualized" and left["invariant"] == [], left
        assert "devirtualize failed" in left["virtualized_reason"], left
        assert [i["name"] for i in left["instances"] if i["status"] == "running"] == ["b"]
        assert control_request(node, "devirtualize")["ok"]
    if fault == "agent-dies-after-serving":
        node.guest.expect(r"^\[b\] webkv: fault=agent-close$", timeout=5)
    assert_known_state(node, before, "b", outcome)
    status, report = node.upgrade("v1")
    assert status == 0 and report["result"]["outcome"] == "upgraded", report
    assert status_on(idle)["version"] == "v1"
    assert node.lost_on_disk(load) == []


def test_idle_keep_alive_connection_moves_to_the_new_instance(node):
    idle = node.keep_alive()
    before = status_on(idle)
    assert before["version"] == "v1" and before["instance"] != "b"
    status, report = node.upgrade("v2")
    assert status == 0, report
    after = status_on(idle)  # same TCP connection, now answered by B
    assert (after["version"], after["instance"], after["role"]) == ("v2", "b", "primary")
    idle.request("PUT", "/kv/moved", body=b"yes")
    assert idle.getresponse().status == 201
    assert node.get("/kv/moved") == (200, b"yes")


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
    with upgrade_held_in_acquire(node.control, node.kernels / "webkv-v2.elf") as first:
        status, second = node.upgrade("v2")
        assert status != 0 and "already running" in second["error"], second
        assert second["code"] == "busy"
        # Every other mutating operation is refused too, at once, and changes nothing.
        for op, args in [
            ("start", {"kernel": str(node.kernels / "probe.elf")}),
            ("stop", {"name": "a"}),
            ("virtualize", {}),
            ("devirtualize", {}),
            ("pause", {"name": "a"}),
            ("resume", {"name": "a"}),
            ("move", {"device": "com1", "to": "a"}),
        ]:
            asked = time.monotonic()
            reply = control_request(node, op, **args)
            assert (reply["ok"], reply["code"]) == (False, "busy"), (op, reply)
            assert time.monotonic() - asked < 1.0
        assert control_request(node, "status")["ok"]  # status is not mutating
    reply = first["reply"]
    assert reply["ok"] and reply["result"]["rolled_back"], reply
    assert json.loads(node.get("/status")[1])["version"] == "v1"


@pytest.mark.parametrize("script", ["online_upgrade.py", "rollback_demo.py"])
def test_examples_run_and_report_nothing_lost(kernels, script):
    from conftest import ROOT

    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["failed_requests"] == 0 and report["lost_writes"] == 0  # on the disk
    assert report["acknowledged_writes"] > 0 and report["writes_checked"] > 0
    assert {"max_stall_ms", "p99_ms", "phases"} <= set(report)


def test_upgrade_goes_on_when_the_requesting_client_disappears(node):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(node.control)
        request = {"op": "upgrade", "kernel": str(node.kernels / "webkv-v2.elf")}
        s.sendall(json.dumps(request).encode() + b"\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = json.loads(node.get("/status")[1])
        if status["version"] == "v2":
            break
        time.sleep(0.1)
    assert status["version"] == "v2" and status["role"] == "primary"


def control_request(node, op: str, **request) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(120)
        s.connect(node.control)
        s.sendall(json.dumps({"op": op, **request}).encode() + b"\n")
        with s.makefile("rb") as reader:
            for line in reader:
                message = json.loads(line)
                if "ok" in message:
                    return message
    raise AssertionError("no reply")


@contextmanager
def upgrade_held_in_acquire(control: str, kernel: Path, seconds: float = 3.0) -> Iterator[dict]:
    """An upgrade to ``kernel`` held in its acquire phase for ``seconds`` (B boots with
    fault=never-serving and never answers): running when the block starts; after it,
    the upgrade's reply is the yielded dict's "reply"."""
    upgrade = {
        "op": "upgrade",
        "kernel": str(kernel),
        "inject": "never-serving",
        "timeouts": {"acquire": seconds},
    }
    outcome: dict = {}
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(control)
        s.sendall(json.dumps(upgrade).encode() + b"\n")
        with s.makefile("rb") as reader:
            assert "progress" in json.loads(reader.readline())  # it is running now
            yield outcome
            for line in reader:  # progress lines, then the reply
                if "ok" in (message := json.loads(line)):
                    outcome["reply"] = message
                    return
    raise AssertionError("no reply")


def upgrade_request(node, **request) -> dict:
    return control_request(node, "upgrade", **request)


def test_a_kernel_that_never_reports_ready_is_rolled_back(node):
    # probe.elf boots fine but has no maintenance agent: it never answers ready?.
    before = leak_counters(node)
    reply = upgrade_request(
        node, kernel=str(node.kernels / "probe.elf"), cmdline="probe=idle", timeouts={"ready": 2}
    )
    result = reply["result"]
    assert reply["ok"] and result["rolled_back"] and result["failed_phase"] == "ready"
    # Each of the ~40 failed ready? polls opened an agent connection and a listener:
    # none is left.
    assert_known_state(node, before, "a", "rolled_back")
    status = json.loads(node.get("/status")[1])
    assert status["version"] == "v1" and status["role"] == "primary"


def test_malformed_upgrade_requests_change_nothing(node):
    for request in (
        {},
        {"kernel": 5},
        {"kernel": "x", "timeouts": {"ready": -1}},
        {"kernel": "x", "inject": "meteor"},
    ):
        reply = upgrade_request(node, **request)
        assert not reply["ok"] or reply["result"]["failed_phase"] == "preflight", reply
    assert json.loads(node.get("/status")[1])["version"] == "v1"


def test_the_agent_arms_faults_that_fire_once(kernels, tmp_path):
    disk = tmp_path / "kv.img"
    disk.write_bytes(bytes(16 << 20))
    http_port, agent_port = free_port(), free_port()
    args = ["boot", str(kernels / "webkv-v1.elf"), "--disk", str(disk), "--timeout", "120"]
    args += ["--forward", f"127.0.0.1:{http_port}=80", "--forward", f"127.0.0.1:{agent_port}=7000"]
    with GuestProcess([*args, "--cmdline", "console=ttyS0 fault=never-serving"]) as guest:
        guest.expect(r"^webkv: fault-armed=never-serving$", timeout=30)
        guest.expect(r"webkv: ready", timeout=30)

        def agent() -> tuple[socket.socket, Callable[[str], str]]:
            sock = socket.create_connection(("127.0.0.1", agent_port), timeout=10)
            reader = sock.makefile("rb")

            def ask(command: str) -> str:
                sock.sendall(command.encode() + b"\n")
                return reader.readline().decode().strip()

            return sock, ask

        def put(key: str) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
            conn.request("PUT", f"/kv/{key}", body=b"x")
            status = conn.getresponse().status
            conn.close()
            return status

        first, ask = agent()
        assert ask("fault meteor") == "error unknown-fault"
        assert ask("acquire").startswith("serving")  # already serving: never-serving waits
        assert ask("fault release-refused") == "ok fault=release-refused"
        assert ask("release") == "refused fault-injected"
        guest.expect(r"^webkv: fault=release-refused$")
        assert put("still-serving") == 201
        assert ask("release") == "released"  # it fired once
        assert ask("fault never-serving") == "ok fault=never-serving"
        first.sendall(b"acquire\n")
        guest.expect(r"^webkv: fault=never-serving$")
        first.settimeout(1.0)
        with pytest.raises(TimeoutError):
            first.recv(100)  # no answer, ever
        second, ask = agent()
        assert ask("ready?") == "ready v1"  # the rest of webkv runs on
        assert ask("acquire").startswith("serving keys=1")  # fired once
        assert ask("fault release-refused") == "ok fault=release-refused"
        assert ask("fault none") == "ok fault=none"
        assert ask("release") == "released"
        # the console can be behind the replies (they do not go through the VMM
        # with a vsock back-end process): wait for the line before reading past it
        guest.expect(r"fault-armed=none$[\s\S]*^webkv: released keys=")
        assert "webkv: fault=" not in guest.stdout.split("fault-armed=none")[-1]
        first.close()
        second.close()


def test_forced_upgrade_fences_an_old_instance_that_hangs_in_its_release(node):
    """--force: the release times out (A's agent hangs), and instead of rolling back to
    A the upgrade fences it (paused, the disk lease moved) and goes on to B."""
    idle = node.keep_alive()
    assert status_on(idle)["version"] == "v1"
    before = leak_counters(node)
    load = KvLoad(node.port, clients=4).start()
    time.sleep(0.3)
    args = ("--inject", "release-timeout", "--timeout", "release=1", "--force")
    status, report = node.upgrade("v2", *args)
    time.sleep(0.3)
    load.stop()
    result = report["result"]
    assert status == 0 and result["outcome"] == "upgraded" and result["after"] == "v2", result
    assert "did not release" in result["forced"] and result["invariant"] == [], result
    node.guest.expect(r"^webkv: fault=release-hang$", timeout=5)
    assert not load.failures, load.failures[:5]
    assert load.reconnects == 0 and len(load.acked) > 0
    assert status_on(idle)["version"] == "v2"  # A's idle connection went to B
    assert_known_state(node, before, "b", "upgraded")
    status, report = node.upgrade("v1")
    assert status == 0 and report["result"]["outcome"] == "upgraded", report
    assert node.lost_on_disk(load) == []


def test_force_does_not_override_a_refused_release(node):
    status, report = node.upgrade("v2", "--inject", "release-refused", "--force")
    assert status == 3 and report["result"]["failed_phase"] == "release", report
    assert "forced" not in report["result"]
