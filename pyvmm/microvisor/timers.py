"""Time for the scheduler: a one-shot alarm thread, and when a halted instance's own
LAPIC timer is due (read from its saved LAPIC and MSRs)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..cpu_state import (
    APIC_IRR,
    APIC_LVTT,
    APIC_TMCCT,
    APIC_TMICT,
    LVT_MASKED,
    LVT_TIMER_MODE,
    LVT_TIMER_TSC_DEADLINE,
    CpuState,
    lapic_reg,
    timer_ns_per_count,
)


def interrupt_pending(cpu: CpuState) -> bool:
    """An interrupt is already requested in the saved LAPIC (IRR)."""
    return any(lapic_reg(cpu.lapic, APIC_IRR + 0x10 * i) for i in range(8))


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
