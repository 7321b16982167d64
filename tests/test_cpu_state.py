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


class FakeVcpu:
    """MSRs as KVM would have them: some cannot be read, some not written back."""

    def __init__(self, unreadable: set[int], unwritable: set[int]) -> None:
        self.values = {0x174: 8, 0x4B564D01: 0x2001, 0x10: 5, 0x3B: 0, 0x6E0: 0, 0x999: 1}
        self.unreadable, self.unwritable = unreadable, unwritable

    def get_msrs(self, indices):
        for index in indices:
            if index in self.unreadable:
                raise OSError(22, f"KVM_GET_MSRS (MSR {index:#x} unreadable)")
        return {index: self.values[index] for index in indices}

    def set_msrs(self, values):
        for index in values:
            if index in self.unwritable:
                raise OSError(22, "KVM_SET_MSRS")


def test_switched_msrs_are_the_index_list_but_the_clock_each_checked():
    from pyvmm.cpu_state import switched_msrs

    vcpu = FakeVcpu(unreadable={0x999}, unwritable=set())
    chosen, left_out = switched_msrs(vcpu, [0x174, 0x10, 0x3B, 0x6E0, 0x4B564D01, 0x999])
    assert chosen == [0x174, 0x4B564D01]  # the paravirtual kvmclock MSR too
    assert set(left_out) == {0x10, 0x3B, 0x6E0, 0x999}
    assert "cannot read" in left_out[0x999]
    vcpu = FakeVcpu(unreadable=set(), unwritable={0x174})
    chosen, left_out = switched_msrs(vcpu, [0x174, 0x4B564D01])
    assert chosen == [0x4B564D01] and "cannot restore" in left_out[0x174]
