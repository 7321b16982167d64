"""The Microvisor: devirtualized and virtualized modes, OS instances, world switches.

Threads: the vCPU thread runs ``Microvisor.run``. Every operation that touches vCPU
or irqchip state (virtualize, a world switch, stop, devirtualize) runs on that
thread, between two KVM_RUNs, posted with ``Machine.call_on_vcpu``; other threads
(the control socket) wait for the result with a time-out.

Devirtualized, ``run`` is simply ``Machine.run``: the plain loop, direct interrupt
delivery, the node's buses. Virtualized, ``run`` alternates instances on the vCPU:
an instance runs until its slice ends (when another instance has work), a held
interrupt arrives for the other instance, or it exits; a halted instance is not
scheduled again until an interrupt or its own timer is due. A paused instance is not
scheduled at all (its interrupts wait) until it is resumed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from ioctl import numbers as n

from ..cpu_state import CpuState, StateSwitcher, copy_state
from ..machine import Machine, RunResult, apply_entry_state
from ..memory import Partition
from .instance import RETIRED, OsInstance
from .interrupts import IrqRouter
from .isolation import SYMMETRIC, PartitionSlots
from .ownership import PER_INSTANCE, build_views, partition_devices
from .timers import Alarm, event_in_delivery, interrupt_pending, timer_due_in

DEVIRTUALIZED = "devirtualized"
VIRTUALIZED = "virtualized"
DEFAULT_SLICE_S = 0.010
MIN_SLICE_S = 0.001  # an instance keeps the vCPU at least this long before preemption
REQUEST_TIMEOUT_S = 10.0
# The reason Machine.run returns with when the microvisor takes the vCPU back.
HANDOVER = "handover"
# How long retiring an instance waits for its devices' work already submitted (a
# block request moving data into its partition); see _quiesce.
QUIESCE_TIMEOUT_S = 2.0

T = TypeVar("T")
log = logging.getLogger("pyvmm.microvisor")


class MicrovisorError(Exception):
    """A request that makes no sense in the current state; nothing was changed."""


class Busy(MicrovisorError):
    """Another mutating operation is running; this one was refused, nothing changed."""


class RequestFailed(MicrovisorError):
    """The request was tried and did not complete (e.g. the vCPU thread did not take it
    in time: then it was cancelled and nothing was changed)."""


class InjectedFault(RuntimeError):
    """An exception raised inside the VMM on purpose (``Microvisor.fail_next``)."""


class OperationGate:
    """One mutating operation at a time (start, stop, move, virtualize, devirtualize,
    pause, resume, upgrade). A second one, from another thread, is refused at once
    with ``Busy``; the thread holding the gate may enter it again (an upgrade starts
    and stops instances itself)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self.holder: str | None = None  # the operation running, for the Busy message

    @contextmanager
    def hold(self, operation: str) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner != me:
            if not self._lock.acquire(blocking=False):
                raise Busy(
                    f"busy: {self.holder or 'another operation'!s} is already running; "
                    f"{operation} was refused, nothing was changed"
                )
            self._owner, self.holder = me, operation
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._owner = self.holder = None
                self._lock.release()


class Microvisor:
    def __init__(
        self, machine: Machine, slice_s: float = DEFAULT_SLICE_S, isolation: str = SYMMETRIC
    ) -> None:
        if len(machine.memory.partitions) < 2:
            raise MicrovisorError("the node needs two partitions to run a second instance")
        if machine.exit_count:
            raise MicrovisorError("arm the microvisor before the node's vCPU first runs")
        self.machine = machine
        self.slice_s = slice_s
        self.mode = DEVIRTUALIZED
        self.instances: dict[str, OsInstance] = {}
        self.current: OsInstance | None = None
        self.router = IrqRouter(self._wake)
        self._alarm = Alarm()
        self._running = False  # the vCPU thread is inside run()
        self._node_pio_bus, self._node_mmio_bus = machine.pio, machine.mmio
        self._slice_started = 0.0
        self.switches = 0
        self.halted_in_delivery = 0  # switch-outs halted with an event in delivery
        self.switch_latency: deque[float] = deque(maxlen=10_000)
        # While an upgrade runs (maintenance.Upgrade sets it): what happened on the
        # vCPU, as (CLOCK_MONOTONIC, event, detail) — world switches with their cost,
        # held interrupts that woke a switched-out instance. None: nothing recorded.
        self.trace: list[tuple[float, str, str]] | None = None
        # Why the node is virtualized although maintenance is over (None: it is not,
        # or maintenance is running); devirtualize clears it.
        self.virtualized_reason: str | None = None
        # How the last upgrade ended (or how far it is): set by maintenance.Upgrade.
        self.last_upgrade: dict[str, object] | None = None
        # Guest RAM the running instance can reach: its own partition (isolation.py).
        self.slots = PartitionSlots(machine.vm, machine.memory, isolation)
        # The world switch's state mover, and the vCPU as created, before any guest:
        # what a newly started instance begins from.
        self.switcher = StateSwitcher(machine.vm, machine.vcpu, machine.kvm.msr_index_list())
        self.pristine = CpuState()
        self.switcher.save(self.pristine)
        self.gate = OperationGate()
        # An instance an upgrade could not retire (it is paused, serving nothing):
        # devirtualize stops it first.
        self.retire_pending: str | None = None
        self._injected: dict[str, int] = {}  # operation → failures still to inject
        self.request_timeout_s = REQUEST_TIMEOUT_S
        # Partition → devices of its retired instance still writing into it.
        self._unquiesced: dict[int, set[str]] = {}
        # Held from an instance's retirement until its devices are quiesced, and by
        # whoever picks a partition to wipe: a crash retires on the vCPU thread while
        # a start may be choosing the partition on another.
        self._quiescing = threading.Lock()

    # --- instances ---------------------------------------------------------------

    def boot(self, kernel: str, cmdline: str = "console=ttyS0", name: str = "a") -> OsInstance:
        """Boot the first instance in partition 0. It owns its console (COM1) and its
        vsock device, and every other device but those of partition 1."""
        if self.instances:
            raise MicrovisorError("the first instance is already booted")
        self.machine.boot(kernel, cmdline, partition=0)
        partition = self.machine.memory.partitions[0]
        self.slots.enter(partition, [partition])  # the spare partition is not the guest's
        instance = OsInstance(name, partition, copy_state(self.pristine))
        instance.record_image(kernel, cmdline)
        partitions = self.machine.memory.partitions[1:]
        others = {d for p in partitions for d in partition_devices(self.machine, p.index)}
        for device in self.machine.devices:
            if device not in PER_INSTANCE and device not in others:
                self._give(device, instance)
        self.instances[name] = instance
        self.current = instance
        return instance

    def live(self) -> list[OsInstance]:
        return [i for i in self.instances.values() if i.live]

    def _spare_partition(self) -> Partition:
        with self._quiescing:
            used = {i.partition.index for i in self.live()}
            for partition in self.machine.memory.partitions:
                if partition.index not in used:
                    busy = self._quiesce(partition.index, (), QUIESCE_TIMEOUT_S)
                    if busy:
                        raise MicrovisorError(
                            f"partition {partition.index} cannot be reused yet: "
                            f"{', '.join(busy)} still writing into it; try again"
                        )
                    return partition
        raise MicrovisorError("no spare partition: stop an instance first")

    # --- requests (any thread) -----------------------------------------------------

    def virtualize(self) -> None:
        with self.gate.hold("virtualize"):
            self._on_vcpu(self._virtualize)

    def devirtualize(self) -> None:
        """Back to one instance on the bare vCPU. Also finishes what an upgrade left
        (``virtualized_reason``): an old instance it could not retire is stopped first."""
        with self.gate.hold("devirtualize"):
            pending = self.instances.get(self.retire_pending or "")
            if pending is not None and pending.live and len(self.live()) > 1:
                self._on_vcpu(lambda: self._stop(pending.name))
            self.retire_pending = None
            self._on_vcpu(self._devirtualize)

    def fail_next(self, operation: str, times: int = 1) -> None:
        """Fault injection (tests, demos): the next ``times`` ``stop`` or
        ``devirtualize`` operations raise ``InjectedFault`` inside the VMM, on the vCPU
        thread, before they change anything."""
        self._injected[operation] = times

    def _injected_fault(self, operation: str) -> None:
        left = self._injected.get(operation, 0)
        if left > 0:
            self._injected[operation] = left - 1
            raise InjectedFault(f"injected fault: {operation} failed inside the VMM")

    def stop(self, name: str) -> None:
        with self.gate.hold("stop"):
            self._on_vcpu(lambda: self._stop(name))

    def move(self, device: str, to: str) -> None:
        with self.gate.hold("move"):
            self._on_vcpu(lambda: self._move(device, to))

    def pause(self, name: str) -> None:
        """Stop scheduling an instance (e.g. one that released its service, kept only
        for a rollback), so it takes no vCPU time from the others."""
        with self.gate.hold("pause"):
            self._on_vcpu(lambda: self._set_paused(name, True))

    def resume(self, name: str) -> None:
        with self.gate.hold("resume"):
            self._on_vcpu(lambda: self._set_paused(name, False))

    def focus(self, name: str, wait: bool = True) -> None:
        """Give ``name`` the vCPU alone: every other live instance is paused (its
        interrupts held), ``name`` resumed, in one request to the vCPU thread. An
        upgrade's hand-off uses it so that A runs its release and then B its acquire
        without being time-sliced with the other. ``wait=False`` posts the request and
        returns at once (an error is logged, not raised): the vCPU thread takes
        requests in order, so any later request finds it done."""
        with self.gate.hold("focus"):
            if wait or not self._running:
                self._on_vcpu(lambda: self._focus(name))
            else:
                self.machine.call_on_vcpu(lambda: self._focus_logged(name))

    def start(
        self,
        kernel: str,
        cmdline: str = "",
        name: str | None = None,
        devices: tuple[str, ...] = (),
    ) -> OsInstance:
        """Boot another instance into the spare partition (virtualized mode only). Its
        console is the partition's (``console=ttyS<partition>`` is added unless the
        command line names a console)."""
        with self.gate.hold("start"):
            return self._start(kernel, cmdline, name, devices)

    def _start(
        self, kernel: str, cmdline: str, name: str | None, devices: tuple[str, ...]
    ) -> OsInstance:
        if self.mode != VIRTUALIZED:
            raise MicrovisorError("virtualize first: a second instance needs virtualized mode")
        name = name or f"i{len(self.instances)}"
        if name in self.instances and self.instances[name].live:
            raise MicrovisorError(f"an instance named {name!r} is already running")
        unknown = [d for d in devices if d not in self.machine.devices]
        if unknown:
            raise MicrovisorError(f"no such device: {', '.join(unknown)}")
        partition = self._spare_partition()
        cmdline = with_console(cmdline, partition.index)
        self.machine.memory.discard(partition.base, partition.size)  # no leftovers
        booted = self.machine.load(kernel, cmdline, partition.index)
        cpu = copy_state(self.pristine)
        apply_entry_state(cpu.regs, cpu.sregs, booted.entry)
        instance = OsInstance(name, partition, cpu)
        instance.record_image(kernel, cmdline)
        # Its own devices (console, and e.g. its vsock and disk front-end) from the start.
        own = partition_devices(self.machine, partition.index)
        wanted = {*own, *devices} & set(self.machine.devices)
        return self._on_vcpu(lambda: self._add(instance, wanted))

    def status(self) -> dict[str, object]:
        """Safe from any thread while instances come and go: it reads snapshots."""
        latencies = sorted(self.switch_latency)
        instances = list(self.instances.values())
        current = self.current

        def pct(p: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e6, 1)

        return {
            "mode": self.mode,
            "current": None if current is None else current.name,
            "instances": [i.describe() for i in instances],
            "switches": self.switches,
            "halted_in_delivery": self.halted_in_delivery,
            "irq_lines": self._irq_lines(),
            "exits": self.machine.exit_count,
            "switch_latency_us": {
                "p50": pct(0.5),
                "p90": pct(0.9),
                "p99": pct(0.99),
                "max": pct(1.0),
            },
            "isolation": self._isolation_status(),
            "guest_ram": {
                "backing": self.machine.memory.backing,
                "mib": self.machine.memory.size >> 20,
            },
            "unquiesced": {str(k): sorted(v) for k, v in dict(self._unquiesced).items()},
        }

    def _isolation_status(self) -> dict[str, object]:
        changes = sorted(self.slots.change_latency)
        first = self.slots.first_update_s
        return {
            "mode": self.slots.mode,
            "mapped_partitions": sorted(self.slots.mapped),
            "slot_updates": self.slots.updates,
            "first_slot_update_us": None if first is None else round(first * 1e6, 1),
            "slot_change_us_p50": round(changes[len(changes) // 2] * 1e6, 1) if changes else None,
        }

    def _irq_lines(self) -> dict[str, dict[str, object]]:
        """Per interrupt line (by GSI): its device, that device's owner, the
        assertions the device made and what the router did with them (and how many
        were a back-end process's calls it polled while virtualized)."""
        lines: dict[str, dict[str, object]] = {}
        for name, attachment in list(self.machine.devices.items()):
            owner = next((i.name for i in self.live() if name in i.devices), None)
            for line in attachment.irqs:
                lines[str(line.gsi)] = {
                    "device": name,
                    "owner": owner,
                    "raised": line.raised,
                    **self.router.line_counts(line.gsi),
                    "routed_calls": self.router.routed_calls.get(line.gsi, 0),
                }
        return lines

    def _on_vcpu(self, operation: Callable[[], T]) -> T:
        """Run ``operation`` on the vCPU thread (or here, if no vCPU thread is running)."""
        if not self._running or threading.get_ident() == self.machine.vcpu.thread_id:
            return operation()
        done = threading.Event()
        outcome: list = []
        state = ["queued"]  # → "running" on the vCPU thread, or "cancelled" here
        lock = threading.Lock()

        def wrapped() -> None:
            with lock:
                if state[0] == "cancelled":
                    return  # its requester gave up: it must not happen after all
                state[0] = "running"
            try:
                outcome.append((True, operation()))
            except BaseException as exc:  # handed back to the requesting thread
                outcome.append((False, exc))
            done.set()

        self.machine.call_on_vcpu(wrapped)
        if not done.wait(self.request_timeout_s):
            with lock:
                if state[0] == "queued":
                    state[0] = "cancelled"
                    raise RequestFailed(
                        "the vCPU thread did not take the request in time; "
                        "it was cancelled, nothing was changed"
                    )
            # Taken meanwhile: it runs now, its outcome is coming.
            if not done.wait(self.request_timeout_s):
                raise RequestFailed("the request is still running on the vCPU thread")
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    # --- operations (vCPU thread) ----------------------------------------------------

    def _virtualize(self) -> None:
        if self.mode == VIRTUALIZED:
            raise MicrovisorError("already virtualized")
        if self.current is None:
            raise MicrovisorError("no instance is running")
        for instance in self.live():
            self._build_views(instance)
        with self.router.lock:  # a back-end's call polled meanwhile waits for the owners
            self.router.attach([line for a in self.machine.devices.values() for line in a.irqs])
            self._assign_lines()
            self.router.current = self.current
        self.slots.trusted = self.current.partition  # for the protect-first mode
        self.machine.pio, self.machine.mmio = self.current.pio, self.current.mmio
        self.mode = VIRTUALIZED
        self._slice_started = time.monotonic()
        self._hand_over()

    def _devirtualize(self) -> None:
        if self.mode != VIRTUALIZED:
            raise MicrovisorError("not virtualized")
        self._injected_fault("devirtualize")
        survivors = self.live()
        if len(survivors) != 1:
            raise MicrovisorError(
                f"{len(survivors)} instances are running; devirtualize needs exactly one"
            )
        survivor = survivors[0]
        survivor.paused = False
        with self.router.lock:
            if survivor is not self.current:
                self._switch(survivor)
            poller = self.router.detach()
        if poller is not None:
            poller.close()
        self.slots.alone(survivor.partition)  # and so it stays, devirtualized
        for instance in self.instances.values():
            instance.refusals.flush()
        self.machine.pio, self.machine.mmio = self._node_pio_bus, self._node_mmio_bus
        self._alarm.set(None)
        ours = f"com{survivor.partition.index + 1}"
        for name, console in self.machine.consoles.items():
            console.line_mode = False
            if name != ours:
                console.flush(end_line=True)  # a retired instance's last words
            elif not console.label:
                console.flush()  # raw from here on: the rest of the line follows
            # A labelled console keeps whole lines: its partial line waits for the rest.
        self.mode = DEVIRTUALIZED
        self.virtualized_reason = None
        self._hand_over()

    def _add(self, instance: OsInstance, devices: set[str]) -> OsInstance:
        # The commit: re-checked here, on the vCPU thread, where instances change.
        index = instance.partition.index
        if any(i.partition.index == index for i in self.live()):
            raise MicrovisorError(f"partition {index} was taken meanwhile; nothing was started")
        if instance.name in self.instances and self.instances[instance.name].live:
            raise MicrovisorError(f"an instance named {instance.name!r} is already running")
        if self.mode != VIRTUALIZED:
            raise MicrovisorError("the node was devirtualized meanwhile; nothing was started")
        for device in devices:
            self._give(device, instance)
        self.instances[instance.name] = instance
        console = f"com{instance.partition.index + 1}"
        self.machine.consoles[console].label = f"[{instance.name}] ".encode()
        for shared in self.machine.consoles.values():
            shared.line_mode = True
        self._build_views(instance)
        self._assign_lines()
        self._hand_over()  # let the scheduler consider the newcomer now
        return instance

    def _stop(self, name: str) -> None:
        instance = self.instances.get(name)
        if instance is None or not instance.live:
            raise MicrovisorError(f"no running instance named {name!r}")
        self._injected_fault("stop")
        if len(self.live()) == 1:
            raise MicrovisorError(f"{name!r} is the only instance; it cannot be stopped")
        self._retire(instance, RunResult("stopped", 0, "stopped by request"))
        self._hand_over()

    def _set_paused(self, name: str, paused: bool) -> None:
        instance = self.instances.get(name)
        if instance is None or not instance.live:
            raise MicrovisorError(f"no running instance named {name!r}")
        if self.mode != VIRTUALIZED:
            raise MicrovisorError("instances are paused only while virtualized")
        if paused and not any(i is not instance and not i.paused for i in self.live()):
            raise MicrovisorError(f"{name!r} is the only instance left to run")
        instance.paused = paused
        self._hand_over()  # reschedule now

    def _focus(self, name: str) -> None:
        instance = self.instances.get(name)
        if instance is None or not instance.live:
            raise MicrovisorError(f"no running instance named {name!r}")
        if self.mode != VIRTUALIZED:
            raise MicrovisorError("instances are paused only while virtualized")
        for other in self.live():
            other.paused = other is not instance
        with self.router.lock:
            if instance is not self.current:
                # Switched here, not at the next turn of the loop: when a waiting
                # focus returns, ``name`` is on the vCPU (an upgrade asks A to release
                # right after, and A gets the request at once).
                self._switch(instance)
        self._hand_over()  # the loop's next turn starts its slice

    def _focus_logged(self, name: str) -> None:
        if self.trace is not None:
            self.trace.append((time.monotonic(), "focus taken", name))
        try:
            self._focus(name)
        except MicrovisorError as exc:
            log.warning("focus on %s: %s", name, exc)

    def _move(self, device: str, to: str) -> None:
        if device not in self.machine.devices or device in PER_INSTANCE:
            raise MicrovisorError(f"no movable device named {device!r}")
        target = self.instances.get(to)
        if target is None or not target.live:
            raise MicrovisorError(f"no running instance named {to!r}")
        if self.mode != VIRTUALIZED:
            raise MicrovisorError("devices move between instances only while virtualized")
        self._give(device, target)
        for instance in self.live():
            self._build_views(instance)
        if self.current is not None:
            self.machine.pio, self.machine.mmio = self.current.pio, self.current.mmio
        self._assign_lines()

    def _build_views(self, instance: OsInstance) -> None:
        build_views(
            instance,
            self.machine.devices,
            self._node_pio_bus,
            self._node_mmio_bus,
            self.machine.memory.size,
        )

    def _give(self, device: str, owner: OsInstance) -> None:
        """Make ``owner`` the only owner of ``device``. A DMA-capable device is reset and
        confined to the new owner's partition: it must not keep writing into rings the
        previous owner set up, nor reach into another partition."""
        for instance in self.instances.values():
            instance.devices.discard(device)
        owner.devices.add(device)
        confine = getattr(self.machine.devices[device].device, "set_dma_window", None)
        if confine is not None:
            confine(owner.partition.base, owner.partition.size)

    def _assign_lines(self) -> None:
        for name, attachment in self.machine.devices.items():
            owner = next((i for i in self.live() if name in i.devices), None)
            for line in attachment.irqs:
                self.router.set_owner(line, owner)

    def _retire(self, instance: OsInstance, result: RunResult) -> None:
        with self._quiescing:
            instance.status = RETIRED
            instance.result = result
            instance.held.clear()
            released = instance.devices
            instance.devices = set()  # unowned until moved: they serve nobody now
            self._assign_lines()
            started = time.perf_counter()
            self._quiesce(instance.partition.index, released, QUIESCE_TIMEOUT_S)
            instance.quiesce_s = round(time.perf_counter() - started, 6)

    def _quiesce(self, partition: int, devices: Iterable[str], timeout: float) -> list[str]:
        """Stop the devices of a gone instance before its partition is wiped or
        reused: queues stopped, block I/O already submitted finished, vsock streams
        back to their listeners; afterwards they write nothing into guest RAM. I/O
        that outlives ``timeout`` cannot be abandoned, so the partition stays out of
        use until it ends (checked again here). Returns the devices still busy.
        Called with ``_quiescing`` held."""
        deadline = time.monotonic() + timeout
        busy = []
        for name in sorted({*devices, *self._unquiesced.pop(partition, ())}):
            device = self.machine.devices[name].device
            try:
                idle = device.quiesce(max(0.0, deadline - time.monotonic()))
            except Exception:  # a device bug must not end the node; its state is unknown
                log.exception("%s: quiesce failed", name)
                idle = False
            if not idle:
                busy.append(name)
        if busy:
            self._unquiesced[partition] = set(busy)
            log.warning("partition %d: %s still writing into it", partition, ", ".join(busy))
        return busy

    # --- the vCPU loop -----------------------------------------------------------------

    def run(self, timeout: float | None = None) -> RunResult:
        """Run the node until its last instance ends (or the time-out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._running = True
        try:
            while True:
                remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
                if self.mode == DEVIRTUALIZED:
                    result = self.machine.run(remaining)
                    if result.reason == HANDOVER:
                        continue
                    if self.current is not None:
                        self._retire(self.current, result)
                    return result
                result = self._run_slice(remaining)
                if result is not None:
                    return result
        finally:
            self._running = False
            self._alarm.close()

    def _run_slice(self, remaining: float | None) -> RunResult | None:
        """One turn of the virtualized loop; a RunResult when the node is done."""
        with self.router.lock:
            chosen = self._pick()
            if chosen is not self.current:
                self._switch(chosen)
        self._arm_alarm(chosen)
        self._slice_started = time.monotonic()
        chosen.slices += 1
        result = self.machine.run(remaining)
        self._alarm.set(None)
        if result.reason == HANDOVER:
            return None
        if result.reason == "timeout":
            return result
        self._retire(chosen, result)  # a power-off or crash retires this instance only
        if not self.live():
            return result
        return None

    def _pick(self) -> OsInstance:
        live = [i for i in self.live() if not i.paused] or self.live()
        if not live:
            raise MicrovisorError("no instance left to run")
        current = self.current if self.current in live else None
        now = time.monotonic()
        runnable = [i for i in live if i is current or self._has_work(i, now)]
        if current is not None and len(runnable) > 1:
            others = [i for i in runnable if i is not current]
            return others[0]  # round robin between two: the other one's turn
        if runnable:
            return runnable[0]
        return current or live[0]  # all idle: wait in KVM for the current one's interrupt

    def _has_work(self, instance: OsInstance, now: float) -> bool:
        if instance.held or not instance.halted:
            return True
        return instance.wake_at is not None and instance.wake_at <= now

    def _arm_alarm(self, running: OsInstance) -> None:
        """When to take the vCPU back: the slice end if another instance has work, or
        when a halted instance's own timer is due."""
        now = time.monotonic()
        others = [i for i in self.live() if i is not running and not i.paused]
        if any(self._has_work(i, now) for i in others):
            self._alarm.set(now + (running.slice_s or self.slice_s), self._preempt)
            return
        wakes = [i.wake_at for i in others if i.wake_at is not None]
        if wakes:
            self._alarm.set(min(wakes), self._preempt)

    def _hand_over(self) -> None:
        """Make the machine's run loop return to ``run`` at the next kick (to switch,
        or change mode); vCPU thread only."""
        self.machine.end_run(RunResult(HANDOVER, 0))

    def _preempt(self) -> None:
        self.machine.call_on_vcpu(self._hand_over)

    def _wake(self, instance: OsInstance) -> None:
        """A held interrupt arrived for ``instance`` (any thread): give it the vCPU soon."""
        if self.mode != VIRTUALIZED or instance is self.current or instance.paused:
            return
        if self.trace is not None:
            self.trace.append((time.monotonic(), "held-irq", instance.name))
        ran_for = time.monotonic() - self._slice_started
        if ran_for >= MIN_SLICE_S:
            self._preempt()
        else:
            self._alarm.set(self._slice_started + MIN_SLICE_S, self._preempt)

    def _switch(self, to: OsInstance) -> None:
        """World switch; vCPU thread, router lock held."""
        started = time.perf_counter()
        machine = self.machine
        previous = self.current
        if previous is not None and previous.live:
            self.switcher.save(previous.cpu)
            if previous.cpu.mp_state == n.KVM_MP_STATE_HALTED and event_in_delivery(previous.cpu):
                # Halted though KVM holds an interrupt (NMI, exception) already taken
                # for delivery: a CPU would be running it, but KVM's wake-up test
                # does not look at such events, so restored halted it would sleep
                # until something else woke it. Counted; not seen on this host.
                previous.cpu.mp_state = n.KVM_MP_STATE_RUNNABLE
                self.halted_in_delivery += 1
            previous.halted = (
                previous.cpu.mp_state == n.KVM_MP_STATE_HALTED
                and not interrupt_pending(previous.cpu)
            )
            due = timer_due_in(previous.cpu, machine.tsc_khz) if previous.halted else None
            previous.wake_at = None if due is None else time.monotonic() + due
        slots_started = time.perf_counter()
        self.slots.enter(to.partition, [i.partition for i in self.live()])
        slots_took = time.perf_counter() - slots_started
        self.switcher.restore(to.cpu)
        machine.pio, machine.mmio = to.pio, to.mmio
        self.current = to
        self.router.switched_in(to)
        self.switches += 1
        took = time.perf_counter() - started
        self.switch_latency.append(took)
        if self.trace is not None:
            detail = f"to {to.name} {took * 1e6:.0f}us (slots {slots_took * 1e6:.0f}us)"
            self.trace.append((time.monotonic(), "switch", detail))


def with_console(cmdline: str, partition: int) -> str:
    """An instance's console is its partition's UART (ttyS0 for partition 0, ttyS1 for
    1): added unless the command line names a console itself."""
    if any(word.startswith("console=") for word in cmdline.split()):
        return cmdline
    return f"{cmdline} console=ttyS{partition}".strip()
