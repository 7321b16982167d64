"""Interrupts exactly once while virtualized: every raise of a line reaches its owner
(held while the owner is switched out or paused, replayed at its switch-in), never
another instance, and no handler runs without a raise. Checked against the guest's
own log of handler runs (probe.elf irq-count, irqlog=1; see tests/irq_audit.py).

Each KVM test runs with both kinds of interrupt source (tests/irq_raiser.py): the
VMM's own trigger (thread back-ends) and another process writing the line's eventfd
(process back-ends: KVM injects those devirtualized, the microvisor polls and routes
them while virtualized)."""

from __future__ import annotations

import random
import re
import select
import threading
import time
from collections.abc import Callable

import pytest
from irq_audit import Audit, GuestIrqLog, Raise, Turn, host_tsc
from irq_raiser import CALLERS
from test_microvisor import run_scripted

from pyvmm.cpu_state import IOAPIC, CpuState
from pyvmm.devices.bus import Device
from pyvmm.lines import IrqfdLine, IrqLine
from pyvmm.machine import Machine, RunResult
from pyvmm.microvisor import Microvisor
from pyvmm.microvisor.instance import OsInstance
from pyvmm.microvisor.interrupts import IrqRouter

MiB = 1 << 20
LINE_A, LINE_B = 5, 6  # IOAPIC pins of the two host-driven interrupt sources
GUEST = "probe=irq-count pins=5,6 irqlog=1 syscalls=1 spin_us=3000 hz=100"


class Source(Device):
    """A device that is only an interrupt line the test raises."""

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: memoryview) -> None:
        pass


class AuditedMicrovisor(Microvisor):
    """Checks each instance's interrupts exactly when it is switched out."""

    audit: Audit
    logs: dict[str, GuestIrqLog]
    lines: dict[str, tuple[int, ...]]

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine)
        route = self.router.routed_call

        def routed_call(line: IrqfdLine, calls: int) -> None:  # a process's calls, read
            start = host_tsc()
            route(line, calls)
            if hasattr(self, "audit"):
                self.audit.reads.setdefault(line.gsi, []).append((start, host_tsc(), calls))

        self.router.routed_call = routed_call  # type: ignore[method-assign]

    def _switch(self, to: OsInstance) -> None:
        previous = self.current
        out = host_tsc()
        super()._switch(to)
        if not hasattr(self, "audit"):
            return
        if self.audit.turns:
            self.audit.turns[-1].end = out
        self.audit.turns.append(Turn(to.name, host_tsc(), begin=out))
        if previous is not None and previous.live and previous is not to:
            log = self.logs[previous.name]
            lines = self.lines[previous.name]
            waiting = [gsi for gsi in lines if self.calls_waiting(gsi)]
            self.audit.switched_out(previous.name, previous.cpu, out, log, lines, waiting)

    def calls_waiting(self, gsi: int) -> bool:
        """A back-end process's call is in the line's eventfd, not yet read by the
        router (which cannot read it now: the switch holds its lock). Looked at
        without reading it."""
        for attachment in self.machine.devices.values():
            for line in attachment.irqs:
                if line.gsi == gsi and getattr(line, "external", False):
                    poll = select.poll()
                    poll.register(line.fd, select.POLLIN)  # type: ignore[union-attr]
                    return bool(poll.poll(0))
        return False


class Node:
    def __init__(self, kernels, backends: str = "thread") -> None:
        # Each console on its own: a line of a's cut by a virtualize can be flushed
        # in two pieces with one of b's between them.
        self.out = {"a": bytearray(), "b": bytearray()}
        self.lock = threading.Lock()
        self.kernel = str(kernels / "probe.elf")
        self.machine = Machine(
            256 * MiB, partitions=2, console=self._writer("a"), console2=self._writer("b")
        )
        self.line_a = IrqfdLine(self.machine.vm, LINE_A)
        self.machine.attach("src-a", Source(), irqs=(self.line_a,))
        self.mv = AuditedMicrovisor(self.machine)
        self.mv.boot(self.kernel, f"console=ttyS0 {GUEST}", name="a")
        self.line_b = IrqfdLine(self.machine.vm, LINE_B)  # after a's boot: b's alone
        self.machine.attach("src-b", Source(), irqs=(self.line_b,))
        caller = CALLERS[backends]
        self.callers = {LINE_A: caller(self.line_a), LINE_B: caller(self.line_b)}

    def raise_line(self, gsi: int) -> tuple[int, int]:
        """Raise a line once; the host TSC before and after."""
        return self.callers[gsi].call()

    def close(self) -> None:
        for caller in self.callers.values():
            caller.close()
        self.machine.close()

    def _writer(self, name: str) -> Callable[[bytes], None]:
        def write(data: bytes) -> None:
            with self.lock:
                self.out[name] += data

        return write

    def wait_for(self, name: str, pattern: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.out[name].decode(errors="replace"), re.MULTILINE):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.out!r}"
            time.sleep(0.01)

    def start_b(self) -> None:
        self.mv.virtualize()
        self.mv.start(self.kernel, f"console=ttyS1 {GUEST}", name="b", devices=("src-b",))
        # Both route their pins before any raise: an edge on a masked pin is lost,
        # as on hardware.
        self.wait_for("a", r"^probe: irq-count routed=0x60")
        self.wait_for("b", r"^\[b\] probe: irq-count routed=0x60")

    def audit(self) -> Audit:
        machine, mv = self.machine, self.mv
        audit = Audit(machine.tsc_khz)
        mv.logs = {
            name: GuestIrqLog(machine.memory, self.kernel, machine.memory.partitions[i])
            for i, name in enumerate(("a", "b"))
        }
        mv.lines = {"a": (LINE_A,), "b": (LINE_B,)}

        def measure() -> None:  # KVM's TSC offset, from the narrowest of 20 brackets
            best = None
            for _ in range(20):
                before = host_tsc()
                guest = machine.vcpu.get_msrs([0x10])[0x10]
                after = host_tsc()
                if best is None or after - before < best[0]:
                    best = (after - before, guest - (before + after) // 2)
            audit.offset = best[1]
            self.vcpu_tid = threading.get_native_id()
            now = host_tsc()
            audit.turns.append(Turn(mv.current.name, now, begin=now))
            mv.audit = audit

        mv._on_vcpu(measure)
        return audit

    def run(self, script, timeout: float = 120.0) -> RunResult:
        return run_scripted(self.mv, script, timeout)


@pytest.fixture(params=sorted(CALLERS))
def node(kernels, request):
    n = Node(kernels, request.param)
    yield n
    n.close()


class Raiser(threading.Thread):
    """Raises one line at random moments: bursts (0.2-4 ms apart) and quiet gaps
    (10-80 ms), so a lost raise is not hidden by the next one."""

    def __init__(self, audit: Audit, node: Node, gsi: int, owner: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.audit, self.node, self.gsi, self.owner = audit, node, gsi, owner
        self.rng = random.Random(seed)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(
            self.rng.choice((self.rng.uniform(0.0002, 0.004), self.rng.uniform(0.01, 0.08)))
        ):
            before, after = self.node.raise_line(self.gsi)
            self.audit.raises.append(Raise(self.gsi, self.owner, before, after))


class CpuWatch(threading.Thread):
    """Samples the vCPU thread's CPU time: the machine is shared by several test
    runs, and time the host did not give the guest is not the microvisor's delay."""

    def __init__(self, audit: Audit, tid: int) -> None:
        super().__init__(daemon=True)
        self.audit = audit
        self.path = f"/proc/self/task/{tid}/schedstat"
        self.stop = threading.Event()

    def run(self) -> None:
        per_ns = self.audit.tsc_khz / 1e6
        while not self.stop.wait(0.001):
            try:
                with open(self.path) as f:
                    run_ns = int(f.read().split()[0])
            except (OSError, IndexError, ValueError):
                return  # no schedstat here: the wall time counts
            self.audit.cpu.append((host_tsc(), int(run_ns * per_ns)))


def test_every_raise_reaches_its_owner_once_over_500_switches(node):
    """Two instances, each with a busy host-driven interrupt source, both spinning
    (at CPL3 and in system calls) and sleeping in turn, with a 100 Hz timer; b is
    paused for a while mid-run. Every instance routes both lines, so a raise that
    reached the wrong instance would run a handler there."""

    def script() -> None:
        node.start_b()
        audit = node.audit()
        raisers = [Raiser(audit, node, LINE_A, "a", 1), Raiser(audit, node, LINE_B, "b", 2)]
        watch = CpuWatch(audit, node.vcpu_tid)
        for thread in (*raisers, watch):
            thread.start()
        started = time.monotonic()
        paused = resumed = False
        while time.monotonic() - started < 60:
            for log in node.mv.logs.values():
                log.poll()
            elapsed = time.monotonic() - started
            if not paused and elapsed > 2:
                node.mv.pause("b")  # b's raises are held until it is resumed
                paused = True
            if paused and not resumed and elapsed > 2.5:
                node.mv.resume("b")
                resumed = True
            if resumed and node.mv.switches >= 600 and elapsed > 6:
                break
            time.sleep(0.005)
        for thread in raisers:
            thread.stop.set()
            thread.join(5)
        time.sleep(0.3)  # the last raises are answered
        watch.stop.set()
        for log in node.mv.logs.values():
            log.poll()
        node.until = host_tsc()

    node.run(script)
    mv, audit, logs = node.mv, node.mv.audit, node.mv.logs
    runs = {name: log.runs for name, log in logs.items()}
    assert mv.switches >= 500
    assert not any(log.overrun for log in logs.values())
    held = [r for r in audit.raises if r.owner == "b"]
    assert len(held) > 100 and len(audit.raises) - len(held) > 100
    problems = audit.violations(runs, {LINE_A, LINE_B})
    if problems:
        at = int(re.search(r" at (\d+)", problems[0])[1])
        raise AssertionError("\n".join([*problems[:10], audit.timeline(runs, at)]))
    # Every raise answered; all but a few within 50 ms of its owner's turns. The few:
    # on this shared, nested host the vCPU thread now and then spends tens of ms in
    # KVM without the guest advancing (docs/decisions.md), interrupts or not.
    latencies = audit.latencies(runs, node.until)
    late = sorted(ms for ms, _ in latencies if ms > 50)
    assert float("inf") not in late
    assert len(late) <= 0.01 * len(latencies), late
    # Every switch-out but the last of each instance checked its raises exactly.
    assert sum(r.answered for r in audit.raises) > 0.9 * len(audit.raises)
    counts = {name: log.counts() for name, log in logs.items()}
    assert counts["a"][LINE_B] == 0 and counts["b"][LINE_A] == 0
    assert counts["a"][LINE_A] == len([t for t, b in runs["a"] if b == LINE_A])
    lines = mv.status()["irq_lines"]
    for gsi in (LINE_A, LINE_B):
        line = lines[str(gsi)]
        raised = len([r for r in audit.raises if r.line == gsi])
        assert line["raised"] == raised and line["dropped"] == 0
        assert line["injected"] + line["held"] == raised
        assert line["replayed"] <= line["held"] and line["replayed"] > 0
    print(
        f"switches={mv.switches} raises={len(audit.raises)} runs="
        f"{ {k: len(v) for k, v in runs.items()} } halted_in_delivery={mv.halted_in_delivery} "
        f"latency_ms p50={sorted(ms for ms, _ in latencies)[len(latencies) // 2]:.2f} "
        f"max={max(ms for ms, _ in latencies):.1f} late={late} "
        f"irq_lines={lines}"
    )


def test_raises_across_mode_changes_reach_the_instance_exactly_once(node):
    """One instance, its line raised at random moments while the node is virtualized
    and devirtualized 50 times: a process's calls move from KVM's irqfd to the
    microvisor's poller and back at each change. No raise is lost at a change (each
    is answered by a handler run) and none is delivered twice (never more handler
    runs than raises before them: devirtualized, KVM injects later, from a work
    queue, so when a raise reached the guest is not known and the exact check of
    ``Audit.violations`` does not apply)."""
    rng = random.Random(3)

    def script() -> None:
        node.wait_for("a", r"^probe: irq-count routed=0x60")
        audit = node.audit()
        raiser = Raiser(audit, node, LINE_A, "a", 4)
        watch = CpuWatch(audit, node.vcpu_tid)
        raiser.start()
        watch.start()
        for _ in range(50):
            for change in (node.mv.virtualize, node.mv.devirtualize):
                time.sleep(rng.uniform(0.005, 0.06))
                node.mv.logs["a"].poll()
                began = host_tsc()
                change()
                # As after a world switch, the guest's first instructions after a
                # change are slow (devirtualize maps all memory afresh): a handler
                # run's TSC may be taken long after its interrupt was accepted.
                audit.turns[-1].end = began
                audit.turns.append(Turn("a", host_tsc(), begin=began))
        raiser.stop.set()
        raiser.join(5)
        time.sleep(0.3)  # the last raises are answered
        watch.stop.set()
        node.mv.logs["a"].poll()
        node.until = host_tsc()

    node.run(script)
    audit, runs = node.mv.audit, {"a": node.mv.logs["a"].runs}
    assert len(audit.raises) > 100 and node.mv.mode == "devirtualized"
    assert not node.mv.logs["a"].overrun
    problems = audit.excess_runs(runs, {LINE_A})
    if problems:
        at = int(re.search(r" at (\d+)", problems[0])[1])
        raise AssertionError("\n".join([*problems[:10], audit.timeline(runs, at)]))
    latencies = audit.latencies(runs, node.until)
    assert len(latencies) == len(audit.raises)  # every raise answered ...
    assert float("inf") not in [ms for ms, _ in latencies]  # ... by a handler run
    routed = node.mv.router.routed_calls.get(LINE_A, 0)
    if node.line_a.external:  # the poller routed some calls, KVM injected the others
        assert 0 < routed < len(audit.raises)
    else:
        assert routed == 0
    print(f"raises={len(audit.raises)} runs={len(runs['a'])} routed={routed}")


def test_move_with_held_interrupts_reaches_only_the_new_owner(node):
    """A raise held for a paused owner is dropped when its device moves (the device
    is reset for the new owner), not replayed into the former owner; raises after
    the move reach only the new owner."""
    seen: dict[str, list[int]] = {}

    def script() -> None:
        node.start_b()
        node.audit()
        a_log, b_log = node.mv.logs["a"], node.mv.logs["b"]
        node.mv.pause("a")
        deadline = time.monotonic() + 5
        while node.mv.current.name != "b":  # a is switched out: its raises are held
            assert time.monotonic() < deadline
            time.sleep(0.001)
        before = a_log.counts()[LINE_A]
        for _ in range(3):
            node.raise_line(LINE_A)  # held: a is paused
            time.sleep(0.01)
        held = 0
        while held < 3 and time.monotonic() < deadline + 5:  # a process's calls are polled
            held = node.mv.status()["irq_lines"][str(LINE_A)]["held"]
        assert held == 3, node.mv.status()["irq_lines"]
        node.mv.move("src-a", "b")
        node.mv.resume("a")
        time.sleep(0.3)  # a runs: a replay would show now
        seen["a_after_move"] = [before, a_log.counts()[LINE_A]]
        seen["line"] = node.mv.status()["irq_lines"][str(LINE_A)]
        b_before = b_log.counts()[LINE_A]
        for _ in range(5):
            node.raise_line(LINE_A)
            time.sleep(0.02)
        deadline = time.monotonic() + 5
        while b_log.counts()[LINE_A] == b_before and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        seen["b"] = [b_before, b_log.counts()[LINE_A]]
        seen["a_end"] = [before, a_log.counts()[LINE_A]]

    node.run(script)
    a_before, a_after = seen["a_after_move"]
    assert a_after == a_before, "a held raise reached the former owner"
    assert seen["a_end"][1] == a_before, "a raise after the move reached the former owner"
    assert seen["b"][1] > seen["b"][0], "the new owner never saw its interrupt"
    line = seen["line"]  # right after the move and a's resume
    assert line["dropped"] == 1 and line["replayed"] == 0 and line["owner"] == "b"


# --- the router alone (no KVM) ------------------------------------------------------


class FakeVm:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def irq_line(self, gsi: int, level: int) -> None:
        self.calls.append((gsi, level))

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        pass


def instance(name: str) -> OsInstance:
    from pyvmm.memory import Partition

    return OsInstance(name, Partition(0, 0, 1 << 21), CpuState())


def test_router_replays_only_to_the_current_owner_and_lowers_saved_level_pins():
    vm = FakeVm()
    woken: list[str] = []
    router = IrqRouter(lambda i: woken.append(i.name))
    a, b = instance("a"), instance("b")
    edge, level = IrqfdLine(vm, 5), IrqLine(vm, 4)  # type: ignore[arg-type]
    try:
        router.attach([edge, level])
        router.set_owner(edge, a)
        router.set_owner(level, a)
        router.current = b
        edge.trigger()  # a is switched out: held
        level(True)
        assert a.held == {4, 5} and vm.calls == [] and woken == ["a", "a"]
        # The level line drops while a is out: not replayed, and a's saved IOAPIC pin
        # (saved high) is lowered so the restore does not re-assert it.
        a.cpu.irqchips[IOAPIC].chip.ioapic.irr = 1 << 4
        level(False)
        assert a.held == {5} and a.cpu.irqchips[IOAPIC].chip.ioapic.irr == 0
        # The edge line moves to b before a is back: dropped, never replayed into a.
        router.set_owner(edge, b)
        assert a.held == set()
        router.switched_in(a)
        assert vm.calls == []
        assert router.line_counts(5) == {"injected": 0, "held": 1, "replayed": 0, "dropped": 1}
        # A raise for the owner on the vCPU goes straight in, as one edge.
        router.switched_in(b)
        edge.trigger()
        assert vm.calls == [(5, 1), (5, 0)] and router.line_counts(5)["injected"] == 1
        assert edge.raised == 2 and level.raised == 1
    finally:
        edge.close()
