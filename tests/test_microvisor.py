"""The microvisor on real guests: instances, world switches, ownership, retirement."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import pytest

from pyvmm.machine import Machine
from pyvmm.microvisor import Microvisor, MicrovisorError

pytestmark = pytest.mark.kvm
MiB = 1 << 20


class Node:
    """A two-partition node whose consoles are captured, driven from a script thread."""

    def __init__(
        self,
        kernels,
        first: str = "probe.elf",
        cmdline: str = "probe=spin",
        mem: int = 256 * MiB,
        devices: Callable[[Machine], object] | None = None,  # attaches more devices
        shared_memory: bool = False,  # guest RAM in a memfd, for back-end processes
    ) -> None:
        self.kernels = kernels
        self.out = bytearray()
        self.lock = threading.Lock()
        self.machine = Machine(
            mem, 2, console=self._write, console2=self._write, shared_memory=shared_memory
        )
        if devices is not None:
            devices(self.machine)
        self.mv = Microvisor(self.machine)
        self.mv.boot(str(kernels / first), f"console=ttyS0 {cmdline}")

    def _write(self, data: bytes) -> None:
        with self.lock:
            self.out += data

    @property
    def text(self) -> str:
        with self.lock:
            return self.out.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.text, re.MULTILINE):
                return m
            time.sleep(0.01)
        raise AssertionError(f"console never showed {pattern!r}: {self.text!r}")

    def wait_ended(self, name: str, timeout: float = 10.0, poll: float = 0.01):
        """Wait (at most ``timeout``) for instance ``name`` to end; the instance."""
        deadline = time.monotonic() + timeout
        while self.mv.instances[name].live and time.monotonic() < deadline:
            time.sleep(poll)
        return self.mv.instances[name]

    def run_with(self, script: Callable[[Node], None], timeout: float = 20.0):
        return run_scripted(self.mv, lambda: script(self), timeout)

    def run_then_close(self, script: Callable[[Node], None], timeout: float = 20.0):
        """run_with, then the machine closed, whether or not the run succeeded."""
        try:
            return self.run_with(script, timeout)
        finally:
            self.machine.close()

    def kernel(self, name: str) -> str:
        return str(self.kernels / name)


def run_scripted(mv: Microvisor, script: Callable[[], None], timeout: float):
    """mv.run(timeout) while ``script`` drives the node from another thread; then the
    run is ended (spinning instances never exit by themselves, and ending the run's
    current instance retires only that one: every other live one is stopped first).
    The script's exception, if any, is raised here."""
    from pyvmm.machine import RunResult

    errors: list[BaseException] = []

    def driver() -> None:
        try:
            script()
        except BaseException as exc:
            errors.append(exc)
        finally:
            for instance in mv.live()[1:]:
                try:
                    mv.stop(instance.name)
                except MicrovisorError:
                    pass
            mv.machine.call_on_vcpu(lambda: mv.machine.stop(RunResult("stopped", 0, "test over")))

    thread = threading.Thread(target=driver)
    thread.start()
    result = mv.run(timeout)
    thread.join(10)
    if errors:
        raise errors[0]
    return result


@pytest.fixture
def node(kernels):
    n = Node(kernels)
    yield n
    n.machine.close()


def test_second_instance_boots_in_the_spare_partition_and_retires_alone(node):
    def script(n: Node) -> None:
        n.mv.virtualize()
        b = n.mv.start(n.kernel("hello.elf"), "console=ttyS1", name="b")
        assert b.partition.index == 1
        n.wait_for(r"\[b\] hello: exit=0")
        time.sleep(0.05)
        status = n.mv.status()
        states = {i["name"]: i["status"] for i in status["instances"]}
        assert states == {"a": "running", "b": "retired"}
        n.mv.devirtualize()
        assert n.mv.status()["mode"] == "devirtualized"

    result = node.run_with(script)
    assert result.reason == "stopped"
    text = node.text
    assert "[b] hello: e820 addr=0x0000000008000000 size=0x0000000008000000 type=1" in text
    assert "[b] hello: load_base=0x0000000008200000" in text
    assert node.mv.switches >= 2


def test_requests_that_make_no_sense_change_nothing(node):
    def script(n: Node) -> None:
        before = n.mv.status()
        for request, message in [
            (n.mv.devirtualize, "not virtualized"),
            (lambda: n.mv.start(n.kernel("hello.elf")), "virtualize first"),
            (lambda: n.mv.stop("a"), "only instance"),
            (lambda: n.mv.stop("nobody"), "no running instance"),
        ]:
            with pytest.raises(MicrovisorError, match=message):
                request()
        assert n.mv.status()["instances"] == before["instances"]
        n.mv.virtualize()
        with pytest.raises(MicrovisorError, match="already virtualized"):
            n.mv.virtualize()
        n.mv.start(n.kernel("probe.elf"), "console=ttyS1 probe=spin", name="b")
        with pytest.raises(MicrovisorError, match="no spare partition"):
            n.mv.start(n.kernel("hello.elf"), "console=ttyS1", name="c")
        with pytest.raises(MicrovisorError, match="exactly one"):
            n.mv.devirtualize()
        with pytest.raises(MicrovisorError, match="no movable device"):
            n.mv.move("debug-exit", "b")
        with pytest.raises(MicrovisorError, match="no running instance"):
            n.mv.move("com1", "zz")
        n.mv.stop("b")
        n.mv.devirtualize()

    node.run_with(script)


def test_two_instances_both_make_progress(node):
    def script(n: Node) -> None:
        n.mv.virtualize()
        n.mv.start(n.kernel("probe.elf"), "console=ttyS1 probe=spin", name="b")
        time.sleep(0.5)
        slices = {i["name"]: i["slices"] for i in n.mv.status()["instances"]}
        assert slices["a"] >= 5 and slices["b"] >= 5, slices

    node.run_with(script)
    latency = node.mv.status()["switch_latency_us"]
    assert latency["p50"] is not None


def test_a_paused_instance_gets_no_vcpu_time_until_resumed(node):
    def script(n: Node) -> None:
        with pytest.raises(MicrovisorError, match="only while virtualized"):
            n.mv.pause("a")
        n.mv.virtualize()
        with pytest.raises(MicrovisorError, match="only instance left"):
            n.mv.pause("a")
        n.mv.start(n.kernel("probe.elf"), "console=ttyS1 probe=spin", name="b")
        time.sleep(0.2)
        n.mv.pause("a")
        with pytest.raises(MicrovisorError, match="only instance left"):
            n.mv.pause("b")
        slices = n.mv.instances["a"].slices
        time.sleep(0.3)  # b spins alone: no slice ends, no switch back to a
        assert n.mv.instances["a"].slices == slices
        assert {i["name"]: i["paused"] for i in n.mv.status()["instances"]} == {
            "a": True,
            "b": False,
        }
        n.mv.resume("a")
        time.sleep(0.2)
        assert n.mv.instances["a"].slices > slices

    node.run_with(script)


def test_focus_gives_one_instance_the_vcpu_alone_at_once(node):
    def script(n: Node) -> None:
        n.mv.virtualize()
        with pytest.raises(MicrovisorError, match="no running instance"):
            n.mv.focus("b")
        n.mv.start(n.kernel("probe.elf"), "console=ttyS1 probe=spin", name="b")
        time.sleep(0.1)
        for name, other in (("b", "a"), ("a", "b"), ("b", "a")):
            n.mv.focus(name)
            assert n.mv.current is n.mv.instances[name]  # switched before it returned
            paused = {i["name"]: i["paused"] for i in n.mv.status()["instances"]}
            assert paused == {name: False, other: True}
            slices = n.mv.instances[other].slices
            time.sleep(0.2)  # both spin, yet no slice ends: the other is not scheduled
            assert n.mv.instances[other].slices == slices
            assert n.mv.current is n.mv.instances[name]
        n.mv.focus("a", wait=False)  # posted: taken by the vCPU thread soon after
        deadline = time.monotonic() + 5
        while n.mv.current is not n.mv.instances["a"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert n.mv.current is n.mv.instances["a"] and n.mv.instances["b"].paused

    node.run_with(script)


def test_access_to_another_instances_device_is_refused(node):
    def script(n: Node) -> None:
        n.mv.virtualize()
        # b is told to use COM1, which a owns: its console writes must go nowhere.
        n.mv.start(n.kernel("probe.elf"), "console=ttyS0 probe=exit:0", name="b")
        n.wait_ended("b")
        assert n.mv.instances["b"].refused > 0

    node.run_with(script)
    assert "probe: action=exit:0" not in node.text  # nothing of b reached COM1


def test_a_crash_retires_only_that_instance(node):
    def script(n: Node) -> None:
        n.mv.virtualize()
        n.mv.start(n.kernel("probe.elf"), "console=ttyS1 probe=triple-fault", name="b")
        n.wait_ended("b")
        b = n.mv.instances["b"]
        assert not b.live and b.result is not None and b.result.reason == "shutdown"
        assert n.mv.instances["a"].live
        n.mv.devirtualize()

    assert node.run_with(script).reason == "stopped"


def test_device_interrupt_reaches_its_owner_after_being_held(kernels):
    node = Node(kernels, cmdline="probe=echo-irq")
    try:

        def script(n: Node) -> None:
            n.wait_for(r"probe: action=echo-irq")
            time.sleep(0.2)  # a is now halted, waiting for its COM1 interrupt
            n.mv.virtualize()
            n.mv.start(n.kernel("probe.elf"), "console=ttyS1 probe=spin", name="b")
            time.sleep(0.2)
            n.machine.com1.feed(b"for a only\n")
            n.wait_for(r'probe: echo="for a only" irqs=\d+')
            n.wait_ended("a", 5)
            assert n.mv.instances["a"].result.status == 0
            assert n.mv.instances["b"].live

        node.run_with(script)
    finally:
        node.machine.close()


def test_a_request_that_times_out_is_cancelled_never_run_later(node):
    from pyvmm.microvisor import RequestFailed

    def script(n: Node) -> None:
        while not n.mv._running:  # the vCPU thread is in run(): requests go to it
            time.sleep(0.01)
        n.mv.request_timeout_s = 0.3
        n.machine.call_on_vcpu(lambda: time.sleep(1.0))  # the vCPU thread is held up
        with pytest.raises(RequestFailed, match="cancelled, nothing was changed"):
            n.mv.virtualize()
        time.sleep(1.0)  # the vCPU thread is free again: the request must not run now
        assert n.mv.mode == "devirtualized"
        n.mv.request_timeout_s = 10.0
        n.mv.virtualize()  # a fresh request works
        n.mv.devirtualize()

    node.run_with(script)


def test_one_mutating_operation_at_a_time(node):
    from pyvmm.microvisor import Busy

    def script(n: Node) -> None:
        n.mv.virtualize()
        outcomes: list[object] = []

        def start(name: str) -> None:
            try:
                outcomes.append(n.mv.start(n.kernel("probe.elf"), "probe=spin", name=name))
            except MicrovisorError as exc:
                outcomes.append(exc)

        with n.mv.gate.hold("test"):  # as if an upgrade were running
            for request in (
                lambda: n.mv.pause("a"),
                n.mv.devirtualize,
                lambda: n.mv.stop("a"),
                lambda: n.mv.move("com1", "a"),
            ):
                errors: list[BaseException] = []
                other = threading.Thread(target=_catch, args=(request, errors))
                other.start()
                other.join(2)
                assert isinstance(errors[0], Busy) and "test is already running" in str(errors[0])
        # Two starts at once: one boots into the spare partition, the other is refused
        # (busy) or finds no partition left; never two instances in one partition.
        threads = [threading.Thread(target=start, args=(name,)) for name in ("b", "c")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        started = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(started) == 1, outcomes
        partitions = [i.partition.index for i in n.mv.live()]
        assert sorted(partitions) == [0, 1]
        # Its console was added: the partition's own UART (ttyS1), so its lines show.
        assert "console=ttyS1" in started[0].cmdline.split()
        n.wait_for(rf"\[{started[0].name}\] probe: action=spin")

    node.run_with(script)


def _catch(request: Callable[[], object], errors: list[BaseException]) -> None:
    try:
        request()
    except BaseException as exc:
        errors.append(exc)


def test_status_never_fails_while_instances_change(node):
    from pyvmm.microvisor.health import node_status

    failures: list[BaseException] = []
    asked = [0]
    done = threading.Event()

    def ask() -> None:
        while not done.is_set():
            try:
                node_status(node.mv)  # ~20 ms (it reads /proc); the rest is cheap
                for _ in range(20):
                    node.mv.status()
                asked[0] += 21
            except BaseException as exc:
                failures.append(exc)

    def script(n: Node) -> None:
        asker = threading.Thread(target=ask)
        asker.start()
        try:
            n.mv.virtualize()
            for round_ in range(6):
                n.mv.start(n.kernel("probe.elf"), "probe=spin", name=f"x{round_}")
                n.mv.stop(f"x{round_}")
            n.mv.devirtualize()
        finally:
            done.set()
            asker.join(5)

    node.run_with(script, timeout=60)
    assert not failures, failures[:3]
    assert asked[0] > 20
