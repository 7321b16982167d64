"""Saved vCPU state, without KVM."""

from __future__ import annotations

from ioctl import structs as s
from pyvmm.cpu_state import (
    APIC_LVTT,
    APIC_TDCR,
    APIC_TMCCT,
    APIC_TMICT,
    CpuState,
    advance_lapic_timer,
    copy_state,
    lapic_reg,
    set_lapic_reg,
)


def test_lapic_timer_keeps_real_time_while_switched_out():
    """A saved LAPIC timer counts down through the time its instance was away."""
    lapic = s.kvm_lapic_state()
    set_lapic_reg(lapic, APIC_TDCR, 0x3)  # divide by 16: 16 ns per count
    set_lapic_reg(lapic, APIC_LVTT, 1 << 16)  # masked one-shot: still counts
    set_lapic_reg(lapic, APIC_TMICT, 0xFFFFFFFF)
    set_lapic_reg(lapic, APIC_TMCCT, 1_000_000)
    advance_lapic_timer(lapic, 1_600_000)  # 1.6 ms = 100,000 counts
    assert lapic_reg(lapic, APIC_TMCCT) == 900_000
    advance_lapic_timer(lapic, 10**12)  # long overdue: fires at once, not never
    assert lapic_reg(lapic, APIC_TMCCT) == 1
    set_lapic_reg(lapic, APIC_LVTT, 2 << 17)  # TSC-deadline timers are absolute
    advance_lapic_timer(lapic, 10**9)
    assert lapic_reg(lapic, APIC_TMCCT) == 1


def test_copies_are_independent():
    state = CpuState()
    state.regs.rip = 0x1000
    state.msrs = {0x10: 1}
    copied = copy_state(state)
    copied.regs.rip = 0x2000
    copied.msrs[0x10] = 2
    copied.irqchips[2].chip.ioapic.redirtbl[4] = 0x24
    assert state.regs.rip == 0x1000 and state.msrs == {0x10: 1}
    assert state.irqchips[2].chip.ioapic.redirtbl[4] == 0
