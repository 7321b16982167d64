"""The "physical" node: memory, the vCPU, buses, devices, interrupt lines and the
vCPU run loop with its exit dispatch.

Start-up order (explicit, as in kvmtool): open KVM and check capabilities → VM with
TSS and identity-map pages → guest RAM slots → in-kernel irqchip and PIT → vCPU
with CPUID → devices on their buses → kernel image and entry state → run.

RAM slots go in before the irqchip on purpose: on these hosts the first memory-slot
update after KVM_CREATE_IRQCHIP waits ~8 ms for a grace period, the same update
before it takes 0.2 ms (measured; docs/decisions.md).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from ioctl import numbers as n
from ioctl import structs as s

from .boot import BootResult, EntryState, load_kernel
from .boot.cpu import SegmentState
from .boot.image_cache import parse_kernel_cached
from .console import Console
from .devices.bus import Device, MmioBus, PortIoBus
from .devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from .devices.uart import COM1, COM1_IRQ, COM2, COM2_IRQ, UART_PORTS, Uart16550
from .errors import EX_SOFTWARE, EX_TIMEOUT, BootError
from .kvm import Kvm, install_kick_handler
from .lines import IrqfdLine, IrqLine, NotifyPoller
from .memory import GuestMemory, choose_backing
from .record import Record

# Pages KVM needs for real-mode emulation on Intel; kept just below the LAPIC.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000

# kvm_run: exit_reason is the third u32; the io exit is at offset 32 as
# direction u8, size u8, port u16, count u32, data_offset u64.
_EXIT_REASON_INDEX = 2
_unpack_io = struct.Struct("<BBHIQ").unpack_from
_IO_EXIT_OFFSET = 32

_EXIT_NAMES = {
    v: k[len("KVM_EXIT_") :]
    for k, v in vars(n).items()
    if k.startswith("KVM_EXIT_") and not k.startswith("KVM_EXIT_IO_")
}


class RunResult(Record):
    """How a run ended. ``status`` is the process exit status ``pyvmm boot`` uses."""

    reason: str  # "exit", "shutdown", "internal-error", "system-event", "timeout", ...
    status: int
    message: str = ""
    registers: str = ""
    exits: int = 0

    @property
    def guest_exited(self) -> bool:
        return self.reason == "exit"


class Attachment(Record):
    """A device as installed in the node: its bus windows and interrupt lines."""

    name: str
    device: Device
    ports: tuple[tuple[int, int], ...] = ()  # (base, size) on the port-I/O bus
    mmio: tuple[tuple[int, int], ...] = ()  # (base, size) on the MMIO bus
    irqs: tuple[IrqLine | IrqfdLine, ...] = ()
    partition: int | None = None  # the memory partition it is wired to (None: any)


# virtio-mmio windows: 4 KiB each from here, interrupts on IOAPIC pins from 5 up.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_WINDOW = 0x1000
VIRTIO_GSIS = (5, 6, 7, 9, 10, 11, 12, 13, 14, 15)
VIRTIO_QUEUE_NOTIFY = 0x050

# Exits KVM completes only at the next KVM_RUN (an IN's data into RAX, the rest of a
# string instruction): see Machine._complete_exit.
_COMPLETED_AT_NEXT_RUN = (n.KVM_EXIT_IO, n.KVM_EXIT_MMIO)


class Machine:
    def __init__(
        self,
        mem_size: int,
        partitions: int = 1,
        console: Callable[[bytes], None] | None = None,
        console2: Callable[[bytes], None] | None = None,
        shared_memory: bool = False,
    ) -> None:
        """``shared_memory``: guest RAM must be a memfd back-end processes can map."""
        self._closed = False
        self.kvm = Kvm()
        try:
            self._build(mem_size, partitions, console, console2, shared_memory)
        except BaseException:
            self.close()
            raise

    def _build(self, mem_size: int, partitions: int, console, console2, shared: bool) -> None:
        self.kvm.require()
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        backing = choose_backing(mem_size, shared=True) if shared else None
        self.memory = GuestMemory(mem_size, partitions, backing)
        for slot in self.memory.slots():
            self.vm.set_user_memory_region(slot.slot, slot.gpa, slot.size, slot.host_address)
        self.vm.create_irqchip()
        self.vm.create_pit2(n.KVM_PIT_SPEAKER_DUMMY)

        install_kick_handler()
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid2(self.kvm.supported_cpuid())
        self.tsc_khz = self.vcpu.tsc_khz()

        self.pio = PortIoBus()
        self.mmio = MmioBus()
        self.devices: dict[str, Attachment] = {}
        self.virtio: dict[str, tuple[int, int]] = {}  # name → (window base, GSI)
        self._notify_poller: NotifyPoller | None = None
        com1_irq, com2_irq = IrqLine(self.vm, COM1_IRQ), IrqLine(self.vm, COM2_IRQ)
        self.consoles = {"com1": Console(console), "com2": Console(console2)}
        self.com1 = Uart16550(self.consoles["com1"], com1_irq)
        self.com2 = Uart16550(self.consoles["com2"], com2_irq)
        self.attach("com1", self.com1, ports=((COM1, UART_PORTS),), irqs=(com1_irq,))
        self.attach("com2", self.com2, ports=((COM2, UART_PORTS),), irqs=(com2_irq,))
        self.attach(
            "debug-exit", DebugExit(self._guest_exit), ports=((DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE),)
        )

        self._result: RunResult | None = None
        self._posted: deque[Callable[[], None]] = deque()
        self._deadline: float | None = None
        self._timeout = 0.0
        self.exit_count = 0
        self._handlers: list[Callable[[], None]] = [self._exit_unexpected] * 64
        self._handlers[n.KVM_EXIT_IO] = self._exit_io
        self._handlers[n.KVM_EXIT_MMIO] = self._exit_mmio
        self._handlers[n.KVM_EXIT_SHUTDOWN] = self._exit_shutdown
        self._handlers[n.KVM_EXIT_INTERNAL_ERROR] = self._exit_internal_error
        self._handlers[n.KVM_EXIT_SYSTEM_EVENT] = self._exit_system_event
        self._handlers[n.KVM_EXIT_FAIL_ENTRY] = self._exit_fail_entry
        self._handlers[n.KVM_EXIT_HLT] = self._exit_hlt

    def attach(
        self,
        name: str,
        device: Device,
        ports: tuple[tuple[int, int], ...] = (),
        mmio: tuple[tuple[int, int], ...] = (),
        irqs: tuple[IrqLine | IrqfdLine, ...] = (),
        partition: int | None = None,
    ) -> Attachment:
        """Install a device on the node's buses under a unique name (``partition``: the
        memory partition whose OS it is wired to, None for any)."""
        if name in self.devices:
            raise ValueError(f"a device named {name!r} is already attached")
        attachment = Attachment(name, device, ports, mmio, irqs, partition)
        for base, size in ports:
            self.pio.register(base, size, device)
        for base, size in mmio:
            self.mmio.register(base, size, device)
        self.devices[name] = attachment
        return attachment

    def attach_virtio(self, name: str, backend: object, partition: int | None = None) -> Attachment:
        """A virtio-mmio device in the next window, with the next interrupt pin;
        announced only to ``partition``'s instance if one is given.

        Queue notifications arrive through ioeventfds (one per queue, matched on the
        queue index) and interrupts leave through an irqfd: a busy device costs the
        vCPU no exit. A back-end with ``kick_fds`` (one in another process) gets the
        ioeventfds themselves: KVM signals it directly.
        """
        from .devices.virtio import VirtioMmioTransport

        index = len(self.virtio)
        if index >= len(VIRTIO_GSIS):
            raise ValueError(f"at most {len(VIRTIO_GSIS)} virtio devices")
        base, gsi = VIRTIO_MMIO_BASE + index * VIRTIO_WINDOW, VIRTIO_GSIS[index]
        line = IrqfdLine(self.vm, gsi)
        # A back-end in another process gets the line's eventfd as its call fd.
        line.external = bool(getattr(backend, "interrupts_bypass_vmm", False))
        transport = VirtioMmioTransport(self.memory, backend, line, name)  # type: ignore[arg-type]
        kick_fds = getattr(backend, "kick_fds", None)
        if kick_fds is not None:
            for queue, fd in enumerate(kick_fds):
                self.vm.ioeventfd(fd, base + VIRTIO_QUEUE_NOTIFY, 4, datamatch=queue)
        else:
            if self._notify_poller is None:
                self._notify_poller = NotifyPoller()
            for queue in range(len(transport.queues)):
                notify = transport.notify
                self._notify_poller.add(self.vm, base + VIRTIO_QUEUE_NOTIFY, queue, notify)
        self.virtio[name] = (base, gsi)
        window = ((base, VIRTIO_WINDOW),)
        return self.attach(name, transport, mmio=window, irqs=(line,), partition=partition)

    def virtio_cmdline(self, names: list[str] | None = None) -> str:
        """``virtio_mmio.device=`` entries announcing devices to a guest (all by default)."""
        chosen = self.virtio if names is None else {n: self.virtio[n] for n in names}
        return " ".join(f"virtio_mmio.device=4K@{base:#x}:{gsi}" for base, gsi in chosen.values())

    # --- boot ------------------------------------------------------------------------

    def boot(self, kernel_path: str, cmdline: str = "", partition: int = 0) -> BootResult:
        """Load a PVH kernel into a partition and point the vCPU at its entry."""
        result = self.load(kernel_path, cmdline, partition)
        sregs = self.vcpu.get_sregs()
        regs = s.kvm_regs()
        apply_entry_state(regs, sregs, result.entry)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(regs)
        return result

    def load(self, kernel_path: str, cmdline: str = "", partition: int = 0) -> BootResult:
        """Load a PVH kernel into a partition; the vCPU is left alone. The command line
        gains the TSC frequency and the virtio devices that partition's instance uses."""
        data = read_kernel_file(kernel_path, self.memory.partitions[partition].size)
        image = parse_kernel_cached(data, os.path.basename(kernel_path))
        writer = self.memory.partition_writer(self.memory.partitions[partition])
        devices = self.virtio_cmdline(self.virtio_for_partition(partition))
        full = f"{with_tsc_khz(cmdline, self.tsc_khz)} {devices}".strip()
        return load_kernel(writer, image, full)

    def virtio_for_partition(self, partition: int) -> list[str]:
        """The devices a partition's kernel is told about: its own and the shared ones."""
        return [name for name in self.virtio if self.devices[name].partition in (None, partition)]

    # --- running ---------------------------------------------------------------------

    def run(self, timeout: float | None = None) -> RunResult:
        """Run the vCPU on this thread until the guest exits, crashes or time runs out."""
        vcpu = self.vcpu
        kvm_run = vcpu.kvm_run
        words = vcpu.run_page.cast("I")  # exit_reason without a ctypes attribute lookup
        handlers = self._handlers
        run = vcpu.runner()
        vcpu.thread_id = threading.get_ident()
        timer = None
        if timeout is not None:
            self._timeout = timeout
            self._deadline = time.monotonic() + timeout
            timer = threading.Timer(timeout, vcpu.kick)
            timer.daemon = True
            timer.start()
        exits = 0
        self._result = None
        try:
            while self._result is None:
                try:
                    run()
                except InterruptedError:
                    kvm_run.immediate_exit = 0
                    words[_EXIT_REASON_INDEX] = n.KVM_EXIT_INTR  # no guest exit pending
                    self._on_kick()
                    continue
                exits += 1
                handlers[words[_EXIT_REASON_INDEX]]()
            if words[_EXIT_REASON_INDEX] in _COMPLETED_AT_NEXT_RUN:
                self._complete_exit(words)
        finally:
            words.release()
            if timer is not None:
                timer.cancel()
            vcpu.thread_id = None
            self.exit_count += exits
        result = self._result
        result.exits = self.exit_count
        return result

    def _complete_exit(self, words: memoryview) -> None:
        """Let KVM finish the exit the run ended on, before anyone saves or replaces the
        vCPU's state: KVM completes an I/O or MMIO exit only at the next KVM_RUN, which
        with immediate_exit set does just that and returns (KVM API, "immediate_exit").
        Otherwise, e.g. after a guest's exit through the debug-exit port, the completion
        would run against whatever state is loaded next (another instance's).
        immediate_exit stays set: the next run starts with one empty round, and a kick
        that arrives meanwhile is not lost."""
        self.vcpu.kvm_run.immediate_exit = 1
        try:
            self.vcpu.run()
        except InterruptedError:
            pass
        words[_EXIT_REASON_INDEX] = n.KVM_EXIT_INTR

    def stop(self, result: RunResult) -> None:
        """End the run from any thread."""
        self._result = result
        self.vcpu.kick()

    def call_on_vcpu(self, function: Callable[[], None]) -> None:
        """Run ``function`` on the vCPU thread between two KVM_RUNs; callable from any
        thread. This is how state that KVM_RUN owns (registers, irqchip) is changed."""
        self._posted.append(function)
        self.vcpu.kick()

    def _on_kick(self) -> None:
        posted = self._posted
        while posted:
            posted.popleft()()
        self._check_deadline()

    def end_run(self, result: RunResult) -> None:
        """Make ``run`` return ``result`` at the next kick, unless the run has ended
        otherwise meanwhile (a guest's own exit wins); vCPU thread only."""
        if self._result is None:
            self._result = result

    def _check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._result = RunResult(
                "timeout",
                EX_TIMEOUT,
                f"time-out: the guest did not exit within {self._timeout:g} s",
                self.dump_registers(),
            )

    # --- exit handlers ---------------------------------------------------------------

    def _exit_io(self) -> None:
        page = self.vcpu.run_page
        direction, size, port, count, offset = _unpack_io(page, _IO_EXIT_OFFSET)
        access = self.pio.write if direction == n.KVM_EXIT_IO_OUT else self.pio.read
        if count == 1:
            access(port, page[offset : offset + size])
            return
        for start in range(offset, offset + count * size, size):  # rep ins/outs
            access(port, page[start : start + size])

    def _exit_mmio(self) -> None:
        mmio = self.vcpu.kvm_run.mmio
        length = mmio.len
        data = memoryview(mmio.data).cast("B")[:length]
        if mmio.is_write:
            self.mmio.write(mmio.phys_addr, data)
        else:
            self.mmio.read(mmio.phys_addr, data)

    def _guest_exit(self, code: int) -> None:
        self._result = RunResult("exit", code, f"guest exited with code {code}")

    def _exit_hlt(self) -> None:
        self._crash("halt", "guest halted with no in-kernel irqchip to wake it")

    def _exit_shutdown(self) -> None:
        self._crash("shutdown", "guest shut down (triple fault)")

    def _exit_internal_error(self) -> None:
        internal = self.vcpu.kvm_run.internal
        data = " ".join(f"{v:#x}" for v in internal.data[: min(internal.ndata, 16)])
        kinds = {
            n.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
            n.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
            n.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
        }
        kind = kinds.get(internal.suberror, f"suberror {internal.suberror}")
        self._crash("internal-error", f"KVM internal error: {kind} (data: {data or 'none'})")

    def _exit_system_event(self) -> None:
        event = self.vcpu.kvm_run.system_event
        kinds = {
            n.KVM_SYSTEM_EVENT_SHUTDOWN: "power-off",
            n.KVM_SYSTEM_EVENT_RESET: "reset",
            n.KVM_SYSTEM_EVENT_CRASH: "crash",
        }
        self._crash("system-event", f"guest requested {kinds.get(event.type, event.type)}")

    def _exit_fail_entry(self) -> None:
        reason = self.vcpu.kvm_run.fail_entry.hardware_entry_failure_reason
        self._crash("fail-entry", f"KVM could not enter the guest (reason {reason:#x})")

    def _exit_unexpected(self) -> None:
        reason = self.vcpu.kvm_run.exit_reason
        name = _EXIT_NAMES.get(reason, str(reason))
        self._crash("unexpected-exit", f"unexpected KVM exit {name}")

    def _crash(self, reason: str, message: str) -> None:
        self._result = RunResult(reason, EX_SOFTWARE, message, self.dump_registers())

    def dump_registers(self) -> str:
        try:
            return format_registers(self.vcpu.get_regs(), self.vcpu.get_sregs())
        except OSError as exc:
            return f"(registers unavailable: {exc})"

    # --- teardown --------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if getattr(self, "_notify_poller", None) is not None:
            self._notify_poller.close()
        for attachment in getattr(self, "devices", {}).values():
            closer = getattr(attachment.device, "close", None)
            if closer is not None:
                closer()
            for line in attachment.irqs:
                line.close()
        for name in ("vcpu", "vm"):
            if hasattr(self, name):
                getattr(self, name).close()
        if hasattr(self, "memory"):
            self.memory.close()
        self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def with_tsc_khz(cmdline: str, khz: int) -> str:
    """Tell the guest its TSC frequency, as ``tsc_khz=``, unless the user already did.

    The guest's clock is TSC-based, and calibrating against another timer would cost
    emulated kernel-mode time on these hosts.
    """
    if any(word.startswith("tsc_khz=") for word in cmdline.split()):
        return cmdline
    return f"{cmdline} tsc_khz={khz}".strip()


def apply_entry_state(regs: s.kvm_regs, sregs: s.kvm_sregs, entry: EntryState) -> None:
    """Put the boot layer's entry state into register structures."""
    for name in ("ds", "es", "fs", "gs", "ss"):
        _apply_segment(getattr(sregs, name), entry.data)
    _apply_segment(sregs.cs, entry.code)
    _apply_segment(sregs.tr, entry.tss)
    sregs.cr0, sregs.cr4, sregs.efer = entry.cr0, entry.cr4, entry.efer
    sregs.cr3 = 0
    regs.rip, regs.rbx, regs.rflags = entry.rip, entry.rbx, entry.rflags


def _apply_segment(seg: s.kvm_segment, state: SegmentState) -> None:
    seg.base, seg.limit, seg.selector = state.base, state.limit, state.selector
    seg.type, seg.present, seg.dpl = state.type, state.present, state.dpl
    seg.db, seg.s, seg.l, seg.g = state.db, state.s, state.l, state.g
    seg.unusable = 0


def read_kernel_file(path: str, limit: int) -> bytes:
    """Read a kernel image, refusing files that could not fit in the partition."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise BootError(
                    f"{path}: kernel file is {size >> 20} MiB, larger than the "
                    f"{limit >> 20} MiB partition"
                )
            return f.read()
    except FileNotFoundError:
        raise BootError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BootError(f"{path}: is a directory, not a kernel image") from None
    except PermissionError:
        raise BootError(f"{path}: permission denied") from None


def format_registers(regs: s.kvm_regs, sregs: s.kvm_sregs) -> str:
    names = [name for name, _ in s.kvm_regs._fields_[:16]]  # rax ... r15
    lines = []
    for i in range(0, len(names), 4):
        lines.append("  ".join(f"{r:>3}={getattr(regs, r):016x}" for r in names[i : i + 4]))
    lines.append(f"rip={regs.rip:016x}  rflags={regs.rflags:08x}")
    lines.append(
        f"cr0={sregs.cr0:08x}  cr2={sregs.cr2:016x}  cr3={sregs.cr3:016x}  "
        f"cr4={sregs.cr4:08x}  efer={sregs.efer:x}"
    )
    lines.append(
        f"cs={sregs.cs.selector:04x} (l={sregs.cs.l} db={sregs.cs.db} dpl={sregs.cs.dpl})  "
        f"ss={sregs.ss.selector:04x}  gdt={sregs.gdt.base:x}/{sregs.gdt.limit:x}  "
        f"idt={sregs.idt.base:x}/{sregs.idt.limit:x}"
    )
    return "\n".join(lines)
