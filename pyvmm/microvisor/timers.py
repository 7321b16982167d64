"""Time for the scheduler: a one-shot alarm thread, and when a halted instance's own
LAPIC timer is due (read from its saved LAPIC and MSRs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..cpu_state import (
    APIC_IRR,
    APIC_LVT0,
    APIC_LVTT,
    APIC_TMCCT,
    APIC_TMICT,
    IOAPIC,
    LVT_DELIVERY_MODE,
    LVT_EXTINT,
    LVT_MASKED,
    LVT_TIMER_MODE,
    LVT_TIMER_TSC_DEADLINE,
    PIC_MASTER,
    PIC_SLAVE,
    REDIR_MASKED,
    REDIR_REMOTE_IRR,
    CpuState,
    lapic_reg,
    timer_ns_per_count,
)


def interrupt_pending(cpu: CpuState) -> bool:
    """Something in the saved state would run the guest again: a vector requested in
    the LAPIC (IRR), an event KVM is delivering (an interrupt, NMI or exception
    injected or pending, an SMI), an IOAPIC pin asserted, unmasked and not waiting
    for its EOI, or a PIC request the LAPIC accepts (LINT0 in ExtINT mode)."""
    if any(lapic_reg(cpu.lapic, APIC_IRR + 0x10 * i) for i in range(8)):
        return True
    if event_in_delivery(cpu):
        return True
    events = cpu.events
    if events.nmi.pending or events.exception.pending or events.smi.pending:
        return True
    ioapic = cpu.irqchips[IOAPIC].chip.ioapic
    for pin in range(24):
        if ioapic.irr >> pin & 1:
            entry = ioapic.redirtbl[pin]
            if not entry & REDIR_MASKED and not entry & REDIR_REMOTE_IRR:
                return True
    lint0 = lapic_reg(cpu.lapic, APIC_LVT0)
    if not lint0 & LVT_MASKED and lint0 & LVT_DELIVERY_MODE == LVT_EXTINT:
        master, slave = cpu.irqchips[PIC_MASTER].chip.pic, cpu.irqchips[PIC_SLAVE].chip.pic
        if master.irr & ~master.imr or slave.irr & ~slave.imr:
            return True
    return False


def event_in_delivery(cpu: CpuState) -> bool:
    """KVM has an interrupt, NMI or exception on its way into the guest (taken from
    the LAPIC or raised, not yet delivered). KVM does not wake a halted vCPU for
    one of these (its wake-up test looks at the LAPIC and at requests), so a vCPU
    saved halted in this state is resumed runnable, as a CPU would be."""
    events = cpu.events
    return bool(events.interrupt.injected or events.nmi.injected or events.exception.injected)


def timer_due_in(cpu: CpuState, tsc_khz: int) -> float | None:
    """Seconds until the saved LAPIC timer fires, or None if it is not armed."""
    lvtt = lapic_reg(cpu.lapic, APIC_LVTT)
    if lvtt & LVT_MASKED:
        return None
    if lvtt & LVT_TIMER_MODE == LVT_TIMER_TSC_DEADLINE:
        if not cpu.tsc_deadline or not tsc_khz:
            return None
        return max(0, cpu.tsc_deadline - cpu.tsc) / (tsc_khz * 1000.0)
    if not lapic_reg(cpu.lapic, APIC_TMICT):
        return None
    return lapic_reg(cpu.lapic, APIC_TMCCT) * timer_ns_per_count(cpu.lapic) / 1e9


class Alarm:
    """Calls a function once at a monotonic time, from its own thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._at: float | None = None
        self._fn: Callable[[], None] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="microvisor-alarm", daemon=True)
        self._thread.start()

    def set(self, at: float | None, fn: Callable[[], None] | None = None) -> None:
        with self._cond:
            # Wake the thread only when it must wait less than it does now: a woken
            # thread competes for the GIL with the vCPU thread's world switch.
            wake = at is not None and (self._at is None or at < self._at)
            self._at, self._fn = at, fn
            if wake:
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._at is None or self._at > time.monotonic()):
                    timeout = None if self._at is None else self._at - time.monotonic()
                    self._cond.wait(timeout)
                if self._closed:
                    return
                fn, self._at, self._fn = self._fn, None, None
            if fn is not None:
                fn()
