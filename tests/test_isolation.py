"""Memory isolation while virtualized: an instance that writes over the other
partition changes nothing there, and its accesses are refused and counted."""

from __future__ import annotations

import hashlib
import re
import time

import numpy as np
import pytest
from test_microvisor import Node

pytestmark = pytest.mark.kvm
MiB = 1 << 20
MEM = 64 * MiB  # two 32 MiB partitions: 8192 pages to scribble over, two exits each
PART = MEM // 2
PAGES = PART // 4096
PASSES = 5
SCRIBBLE_OFFSET = 0x7F8  # probe_user.c: the word written in each page
SCRIBBLE_MAGIC = 0x5C21BB1E  # its high 32 bits


def scribbled_words(node: Node, base: int) -> int:
    """Words of the partition at ``base`` that hold what the scribbler writes."""
    words = node.machine.memory.array(base, PART).view(np.uint64).reshape(PAGES, 512)
    return int(
        np.count_nonzero((words[:, SCRIBBLE_OFFSET // 8] >> np.uint64(32)) == SCRIBBLE_MAGIC)
    )


def last_int(node: Node, pattern: str) -> int:
    found = re.findall(pattern, node.text, re.MULTILINE)
    return int(found[-1]) if found else 0


def computes_on(node: Node) -> None:
    """a (probe=compute) completes 16 more rounds, every one without a wrong result."""
    rounds = last_int(node, r"^probe: compute rounds=(\d+)")
    node.wait_for(rf"^probe: compute rounds={rounds + 16} errors=0", 30)


@pytest.mark.parametrize("intruder", ["b", "a"])
def test_a_scribbler_changes_no_byte_of_the_other_partition(kernels, intruder):
    """The intruder reads and writes one word in every page of the victim's partition,
    PASSES times, while the victim computes (and, for at least one whole pass, while
    it is paused, so its partition can be compared byte for byte)."""
    victim = "a" if intruder == "b" else "b"
    victim_base = 0 if victim == "a" else PART
    compute = "probe=compute mib=8"
    scribble = f"probe=scribble target={victim_base:#x} size={PART:#x} passes={PASSES}"
    first, second = (compute, scribble) if victim == "a" else (scribble, compute)
    label = {"a": "", "b": r"\[b\] "}
    node = Node(kernels, cmdline=first, mem=MEM)

    def compute_rounds() -> int:
        return last_int(node, rf"^{label[victim]}probe: compute rounds=(\d+)")

    def passes() -> int:
        return last_int(node, rf"^{label[intruder]}probe: scribble pass=(\d+)")

    def wait_until(check, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} never happened: {node.text[-2000:]!r}")
            time.sleep(0.01)

    def script(n: Node) -> None:
        n.mv.virtualize()
        n.mv.start(n.kernel("probe.elf"), f"console=ttyS1 {second}", name="b")
        n.wait_for(rf"^{label[intruder]}probe: scribble ready", 30)
        wait_until(lambda: compute_rounds() >= 16, "the victim's computing")
        (n.machine.com1 if intruder == "a" else n.machine.com2).feed(b"g")
        wait_until(lambda: passes() >= 1, "a first pass")
        rounds = compute_rounds()
        assert rounds > 16, "the victim computed while the first pass went on"

        n.mv.pause(victim)
        memory = n.machine.memory
        before = hashlib.sha256(memory.read(victim_base, PART)).digest()
        seen = passes()
        wait_until(lambda: passes() >= seen + 2, "a whole pass while the victim was paused")
        assert hashlib.sha256(memory.read(victim_base, PART)).digest() == before
        n.mv.resume(victim)

        wait_until(lambda: "scribble done" in n.text, "the last pass")
        rounds = compute_rounds()
        wait_until(lambda: compute_rounds() >= rounds + 32, "the victim's computing after")
        assert scribbled_words(n, victim_base) == 0
        intruding = n.mv.instances[intruder]
        assert intruding.refused_memory == 2 * PAGES * PASSES  # every read and write
        assert n.mv.instances[victim].refused_memory == 0
        status = {i["name"]: i for i in n.mv.status()["instances"]}
        assert status[intruder]["refused_memory_accesses"] == 2 * PAGES * PASSES

    result = node.run_then_close(script, timeout=180)
    text = node.text
    assert result.reason == "stopped", result.message
    errors = re.findall(rf"^{label[victim]}probe: compute rounds=\d+ errors=(\d+)", text, re.M)
    assert errors and set(errors) == {"0"}
    reads = re.findall(
        rf"^{label[intruder]}probe: scribble pass=\d+ pages=(\d+) all_ones=(\d+)", text, re.M
    )
    assert reads == [(str(PAGES), str(PAGES))] * PASSES  # every refused read gave all-ones


def test_an_instruction_fetch_from_the_other_partition_stops_the_intruder(kernels):
    """KVM cannot turn an instruction fetch into MMIO: the intruder is retired, the
    victim computes on."""
    node = Node(kernels, cmdline="probe=compute mib=8", mem=MEM)

    def script(n: Node) -> None:
        n.mv.virtualize()
        n.mv.start(n.kernel("probe.elf"), "console=ttyS1 probe=scribble exec=1 size=4096")
        n.wait_for(r"^\[i1\] probe: scribble exec=0x1000", 30)
        intruder = n.wait_ended("i1")
        assert intruder.result is not None and intruder.result.reason == "internal-error"
        computes_on(n)
        n.mv.devirtualize()

    result = node.run_then_close(script, timeout=60)
    assert result.reason == "stopped", result.message
    assert "scribble exec returned" not in node.text


def test_an_instance_that_exits_by_port_io_leaves_the_other_intact(kernels):
    """The guest's OUT to the debug-exit port is completed by KVM at the next KVM_RUN;
    that must happen before the other instance's registers are loaded. Instances boot
    and exit (an OUT at CPL0, a string OUT at CPL3, which KVM's emulator completes)
    again and again while a computes."""
    node = Node(kernels, cmdline="probe=compute mib=8", mem=MEM)

    def script(n: Node) -> None:
        n.mv.virtualize()
        for i in range(10):
            name = f"x{i}"
            action = "exit:7" if i % 2 else "user-exit-rep:7"
            n.mv.start(n.kernel("probe.elf"), f"console=ttyS1 probe={action}", name=name)
            result = n.wait_ended(name, poll=0.005).result
            assert result is not None and (result.reason, result.status) == ("exit", 7)
            assert n.mv.instances["a"].live, n.mv.instances["a"].result
        computes_on(n)
        n.mv.devirtualize()

    result = node.run_then_close(script, timeout=90)
    assert result.reason == "stopped", result.message
    assert "CRASH" not in node.text
