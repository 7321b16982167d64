"""Interrupt delivery checked from both ends: the raises a test makes on host lines,
and the handler runs a guest logs (probe.elf ``probe=irq-count irqlog=1``: the
runtime counts every device handler run in ``user_info.irq_count`` and logs it,
with the guest TSC at entry, in ``user_info.irq_log``; see runtime/uapi.h).

Times are host TSC values. The host reads its own TSC (``host_tsc``) around each
raise; the guest's TSC is the host's plus KVM's constant offset, measured once.

Two checks:
- at every switch-out (exact, no timing): each raise made before the switch for the
  instance switched out has been answered by a handler run, or is still on its way
  in the saved state (LAPIC IRR, an event in delivery, the handler stub cut short);
- over the whole run (``Audit.violations``): no handler run without a raise for that
  instance since its previous run (so none in an instance that did not own the
  line); and (``Audit.latencies``) how long each raise waited for its handler, in
  its owner's time on the vCPU (its next turn, and the ones after if that one ends
  sooner) while the host gave the vCPU thread a CPU.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import struct
import threading
from dataclasses import dataclass, field

from elftools.elf.elffile import ELFFile

from pyvmm.boot.elf import parse_kernel
from pyvmm.boot.layout import place
from pyvmm.cpu_state import APIC_IRR, IOAPIC, CpuState, lapic_reg
from pyvmm.memory import GuestMemory, Partition

KERNEL_VIRT_BASE = 0xFFFF_FFFF_8000_0000
IRQ_COUNT_OFFSET = 2128  # offsetof(struct user_info, irq_count)
IRQ_LOG_HEAD_OFFSET = 2640
IRQ_LOG_OFFSET = 2648
IRQ_LOG_LEN = 256
IRQ_VECTORS = 64
IRQ_VECTOR_BASE = 0x30
LOG_STUB_SIZE = 64
LOG_STUB_LOGGED = 0x26  # offset in a log stub after which the run is in the log

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])
_code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
_code.write(_RDTSC_CODE)
host_tsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(_code)))


def kernel_symbols(kernel: str, names: tuple[str, ...]) -> dict[str, int]:
    with open(kernel, "rb") as f:
        table = ELFFile(f).get_section_by_name(".symtab")
        return {name: table.get_symbol_by_name(name)[0]["st_value"] for name in names}


def kernel_address(kernel: str, virtual: int, partition: Partition) -> int:
    """Guest-physical address of a kernel-window symbol of ``kernel`` in ``partition``."""
    with open(kernel, "rb") as f:
        delta = place(parse_kernel(f.read()), partition).delta
    return virtual - KERNEL_VIRT_BASE + delta


class GuestIrqLog:
    """One guest's handler counts and log; ``poll`` collects new log entries (call
    it before IRQ_LOG_LEN more handler runs can happen)."""

    def __init__(self, memory: GuestMemory, kernel: str, partition: Partition) -> None:
        symbols = kernel_symbols(kernel, ("user_info", "irq_log_stubs"))
        self.memory = memory
        self.user_info = kernel_address(kernel, symbols["user_info"], partition)
        self.stubs = symbols["irq_log_stubs"]  # virtual, as the guest's RIP shows it
        self.seen = 0
        self.runs: list[tuple[int, int]] = []  # (guest TSC & ~0xff, line b)
        self.overrun = False
        self._lock = threading.Lock()

    def counts(self) -> list[int]:
        raw = self.memory.read(self.user_info + IRQ_COUNT_OFFSET, 8 * IRQ_VECTORS)
        return list(struct.unpack(f"<{IRQ_VECTORS}Q", raw))

    def poll(self) -> None:
        with self._lock:
            head = self.memory.read_u64(self.user_info + IRQ_LOG_HEAD_OFFSET)
            if head - self.seen > IRQ_LOG_LEN:
                self.overrun = True
                self.seen = head - IRQ_LOG_LEN
            base = self.user_info + IRQ_LOG_OFFSET
            for n in range(self.seen, head):
                entry = self.memory.read_u64(base + 8 * (n % IRQ_LOG_LEN))
                self.runs.append((entry & ~0xFF, entry & 0xFF))
            self.seen = head

    def stub_cut(self, rip: int) -> int | None:
        """The line whose logging stub ``rip`` is in before its run is logged."""
        b, offset = divmod(rip - self.stubs, LOG_STUB_SIZE)
        if 0 <= b < IRQ_VECTORS and offset < LOG_STUB_LOGGED:
            return b
        return None


def in_irr(cpu: CpuState, line: int) -> bool:
    vector = IRQ_VECTOR_BASE + line
    return bool(lapic_reg(cpu.lapic, APIC_IRR + 0x10 * (vector // 32)) >> (vector % 32) & 1)


def on_its_way(cpu: CpuState, line: int, log: GuestIrqLog) -> bool:
    """The saved state still carries an interrupt of ``line`` into the guest."""
    vector = IRQ_VECTOR_BASE + line
    if in_irr(cpu, line):
        return True
    events = cpu.events
    if events.interrupt.injected and events.interrupt.nr == vector:
        return True
    return log.stub_cut(cpu.regs.rip) == line


def describe(cpu: CpuState) -> str:
    irr = [lapic_reg(cpu.lapic, APIC_IRR + 0x10 * i) for i in range(8)]
    isr = " ".join(f"{lapic_reg(cpu.lapic, 0x100 + 0x10 * i):08x}" for i in range(7, -1, -1))
    ioapic, pic = cpu.irqchips[IOAPIC].chip.ioapic, cpu.irqchips[0].chip.pic
    events = cpu.events
    return (
        f"mp_state={cpu.mp_state} rip={cpu.regs.rip:#x} rflags={cpu.regs.rflags:#x} "
        f"irr={' '.join(f'{w:08x}' for w in reversed(irr))} "
        f"interrupt=({events.interrupt.injected}, {events.interrupt.nr:#x}, "
        f"shadow {events.interrupt.shadow}) nmi=({events.nmi.injected}, {events.nmi.pending}) "
        f"ioapic irr={ioapic.irr:#x} pin5={ioapic.redirtbl[5]:#x} pin6={ioapic.redirtbl[6]:#x} "
        f"pic irr={pic.irr:#x} imr={pic.imr:#x} isr={isr}"
    )


@dataclass
class Raise:
    line: int  # GSI (== IOAPIC pin == the guest's b)
    owner: str  # the instance that owned the line when it was raised
    before: int  # host TSC just before the raise
    after: int  # host TSC just after it
    answered: bool = False  # seen answered at a switch-out


@dataclass
class Turn:
    instance: str
    start: int  # host TSC after the switch-in
    end: int | None = None
    begin: int = 0  # host TSC when the switch to it began


@dataclass
class Audit:
    """What one run observed, and the invariant over it."""

    tsc_khz: int
    offset: int = 0  # guest TSC - host TSC
    raises: list[Raise] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    cuts: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # (switch-out, b)
    # Cuts with a second interrupt of the same line already in the LAPIC's IRR: it
    # arrived after the cut run was accepted, so two runs follow.
    doubles: set[tuple[str, int, int]] = field(default_factory=set)  # (name, switch-out, b)
    lost: list[str] = field(default_factory=list)
    saved: list[tuple[int, str, str]] = field(default_factory=list)  # (switch-out, name, state)
    # The vCPU thread's CPU time (the machine is shared): samples of (host TSC, its
    # time on a CPU so far in TSC units), from /proc schedstat.
    cpu: list[tuple[int, int]] = field(default_factory=list)
    # Per line raised by another process (writing its eventfd): when the router read
    # and routed calls, (host TSC before, after, calls the read returned). Such a raise
    # is in the VMM's hands only from the read that consumed its write, not when its
    # write returns; reads consume writes in order, as many as their count.
    reads: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)

    @property
    def slack(self) -> int:
        # A run's TSC is taken a few emulated instructions after the interrupt was
        # accepted and kept to 256 cycles; the offset is known to a few us.
        return int(0.02 * self.tsc_khz)  # 20 us

    def switched_out(
        self, name: str, cpu: CpuState, out: int, log: GuestIrqLog, lines, waiting=()
    ) -> None:
        """The exact check at a switch-out (vCPU thread, the guest stopped). ``waiting``:
        lines whose eventfd holds a back-end process's call the router has not read
        yet (it will route it to the line's owner); their raises are checked at the
        instance's next switch-out."""
        log.poll()
        self.saved.append((out, name, describe(cpu)))
        # A run accepted before the switch-out but logged after it: its stub was cut
        # short, or KVM held its interrupt in delivery.
        cut = log.stub_cut(cpu.regs.rip)
        if cut is not None:
            self.cuts.setdefault(name, []).append((out, cut))
        interrupt = cpu.events.interrupt
        if interrupt.injected and 0 <= interrupt.nr - IRQ_VECTOR_BASE < IRQ_VECTORS:
            self.cuts.setdefault(name, []).append((out, interrupt.nr - IRQ_VECTOR_BASE))
        for _, b in [c for c in self.cuts.get(name, []) if c[0] == out]:
            if in_irr(cpu, b):
                self.doubles.add((name, out, b))
        for line in lines:
            if line in waiting:
                continue
            runs = [t - self.offset for t, b in log.runs if b == line]
            last = max(runs, default=0)
            way = on_its_way(cpu, line, log)
            for r in self.raises:
                if r.owner != name or r.line != line or r.answered or r.after >= out:
                    continue  # raised during the switch: checked at the next one
                r.answered = True
                if last <= r.before - self.slack and not way:
                    self.lost.append(
                        f"{name}: line {line} raised at {r.before} is neither "
                        f"handled nor pending at the switch-out at {out} ({describe(cpu)})"
                    )

    def violations(self, runs: dict[str, list[tuple[int, int]]], lines: set[int]) -> list[str]:
        """Raises lost at a switch-out, and handler runs without a raise for their
        instance since its previous run there (so also runs in an instance that
        did not own the line when it was raised)."""
        problems = list(self.lost)
        for name, entries in runs.items():
            for line in lines:
                times = sorted(t - self.offset for t, b in entries if b == line)
                mine = sorted(
                    (r for r in self.raises if r.line == line and r.owner == name),
                    key=lambda r: r.before,
                )
                starts = self._starts(name, line, times)
                problems += self._unraised_runs(name, line, times, starts, mine)
        return problems

    def latencies(
        self, runs: dict[str, list[tuple[int, int]]], until: int
    ) -> list[tuple[float, Raise]]:
        """Per raise, how long its owner had the vCPU (and the host gave the vCPU
        thread a CPU) until a handler run answered it, in ms; inf if none did and
        it has had 50 ms; raises too recent to judge are left out."""
        out = []
        for r in self.raises:
            times = sorted(t - self.offset for t, b in runs[r.owner] if b == r.line)
            answer = next((t for t in times if t > r.before - self.slack), None)
            end = until if answer is None else answer
            waited = min(self._turn_time(r.owner, r.before, end), self._on_cpu(r.before, end))
            if answer is None:
                if waited > 50 * self.tsc_khz:
                    out.append((float("inf"), r))
            else:
                out.append((waited / self.tsc_khz, r))
        return out

    def _starts(self, name: str, line: int, times: list[int]) -> list[int]:
        """When each run's interrupt was accepted, at the latest: its TSC; or the
        switch-out that cut it short (stub cut, or KVM held it in delivery); or, for
        the first run of a turn, the switch that began the turn: after a switch the
        guest's first instructions are slow (its memory is mapped afresh), so its
        TSC can be taken long after the acceptance."""
        cuts = sorted(t for t, b in self.cuts.get(name, []) if b == line)
        begins = sorted(t.begin for t in self.turns if t.instance == name)
        starts, previous = [], 0
        for t in times:
            start = t
            earlier = [c for c in cuts if previous < c < t]
            if earlier:
                start = earlier[0]
            began = [b for b in begins if previous < b < t]
            if began:
                start = min(start, began[0])
            starts.append(start)
            previous = t
        return starts

    def excess_runs(self, runs: dict[str, list[tuple[int, int]]], lines: set[int]) -> list[str]:
        """Handler runs that no raise can account for, where a raise's delivery time is
        not known (KVM injects an irqfd's event later, from a work queue): the k-th
        run of a line needs k raises of it before it. Weaker than ``violations``
        (edges coalesce, so a duplicate after coalesced raises goes unseen)."""
        problems = []
        for name, entries in runs.items():
            for line in lines:
                befores = sorted(
                    r.before for r in self.raises if r.line == line and r.owner == name
                )
                times = sorted(t - self.offset for t, b in entries if b == line)
                for k, t in enumerate(times, 1):
                    if bisect.bisect_left(befores, t + self.slack) < k:
                        problems.append(
                            f"{name}: handler run {k} for line {line} at {t} "
                            f"has fewer than {k} raises before it"
                        )
                        break
        return problems

    def _taken(self) -> dict[int, int]:
        """When the VMM had each raise (by id): when its raise returned, or, for a line
        raised by another process, when the router's read that consumed its write
        returned. An eventfd read takes every write made before it, so the reads take
        the line's raises in order, each as many as the count it returned (the first
        read after a raise began need not be its own: with two raises close together,
        an earlier read can take only the first)."""
        taken = {id(r): r.after for r in self.raises}
        for line, reads in self.reads.items():
            queue = sorted((r for r in self.raises if r.line == line), key=lambda r: r.before)
            k = 0
            for _, end, calls in sorted(reads):
                for r in queue[k : k + calls]:
                    taken[id(r)] = max(r.after, end)
                k += calls
        return taken

    def _unraised_runs(self, name, line, times, starts, mine) -> list[str]:
        problems = []
        taken = self._taken()
        for i, t in enumerate(times):
            previous, needed = starts[i - 1] if i else 0, 1
            before_previous = times[i - 2] if i > 1 else 0
            if i and any(
                n == name and b == line and before_previous < c < times[i - 1]
                for n, c, b in self.doubles
            ):
                # The previous run was cut with this one already in the IRR: it was
                # raised after that one's acceptance, which can be long before the
                # cut. Both need their own raise since the run before them.
                previous, needed = (starts[i - 2] if i > 1 else 0), 2
            # A raise that ended after the previous run began and began before this one.
            fits = [r for r in mine if taken[id(r)] > previous - self.slack and r.before < t]
            if len(fits) < needed:
                problems.append(f"{name}: a handler run for line {line} at {t} without a raise")
        return problems

    def _on_cpu(self, start: int, end: int) -> int:
        """CPU time of the vCPU thread in about [start, end] (to the samples around)."""
        before = [c for t, c in self.cpu if t <= start]
        after = [c for t, c in self.cpu if t >= end]
        if not before or not after:
            return end - start
        return after[0] - before[-1]

    def _turn_time(self, name: str, start: int, end: int) -> int:
        """How long ``name`` was on the vCPU between ``start`` and ``end``."""
        total = 0
        for turn in self.turns:
            if turn.instance == name:
                total += max(0, min(end, turn.end or end) - max(start, turn.start))
        return total

    def _stalled(self, start: int, end: int) -> bool:
        """The host left this process's threads waiting for CPU in [start, end]."""
        return any(s < end and e > start for s, e in self.stalls)

    def timeline(self, runs: dict[str, list[tuple[int, int]]], at: int, span_ms: float = 60) -> str:
        """Raises, handler runs, turns and stub cuts around ``at`` (for a failure)."""
        khz = self.tsc_khz
        events = [
            (t - self.offset, f"run {name} line {b}") for name, log in runs.items() for t, b in log
        ]
        events += [(r.before, f"raise line {r.line} for {r.owner}") for r in self.raises]
        events += [(t.start, f"switch-in {t.instance}") for t in self.turns]
        events += [(s, f"read line {line}") for line, rs in self.reads.items() for s, *_ in rs]
        events += [(t, f"switch-out {name}: {state}") for t, name, state in self.saved]
        events += [
            (c, f"stub cut {name} line {b}") for name, cs in self.cuts.items() for c, b in cs
        ]
        return "\n".join(
            f"{(t - at) / khz:+9.3f} ms {what}"
            for t, what in sorted(events)
            if abs(t - at) < span_ms * khz
        )
