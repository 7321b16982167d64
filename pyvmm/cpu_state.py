"""Complete vCPU state, saved and restored as a whole: a world switch between OS
instances, or a newly started instance beginning from the pristine state.

Everything a guest can observe is here: registers, segment and control registers,
xsave (FPU/SSE/AVX), XCRs, every MSR KVM can save (its KVM_GET_MSR_INDEX_LIST, the
paravirtual ones included: kvmclock, steal time, async PF, PV EOI ...) but the clock's,
the LAPIC with its timer, pending events, debug registers and the multiprocessing
state. The VM-wide interrupt controllers and PIT are per instance too, because each
OS programs them.

Restore order follows what KVM requires: LAPIC mode before the TSC deadline MSR,
sregs (with APIC base) before the LAPIC, events last so a pending exception or
interrupt is injected into the restored context. The IOAPIC and PIC follow the
LAPIC: setting the IOAPIC re-asserts the pins saved high, and KVM delivers what
that raises into the LAPIC loaded at that moment, which must be the instance's own
(before it, the delivery would land in the previous instance's LAPIC and be
overwritten, leaving a level pin waiting for an EOI forever). The PIT follows
the irqchips it injects into.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Iterable

from ioctl import numbers as n
from ioctl import structs as s

from .kvm import Vcpu, Vm

log = logging.getLogger("pyvmm.cpu_state")

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_TSC_DEADLINE = 0x6E0
# MSRs of KVM_GET_MSR_INDEX_LIST a world switch leaves alone: the TSC is the node's
# time, which goes on while an instance is switched out (restoring it, or the adjust
# that offsets it, would rewind the clock). The TSC deadline is switched on its own,
# after the LAPIC (KVM ignores it in the wrong LAPIC mode). EFER and APIC_BASE travel
# in sregs and FS/GS base in the segment registers; KVM does not list them.
NOT_SWITCHED = {
    MSR_IA32_TSC: "the TSC is the node's time",
    MSR_IA32_TSC_ADJUST: "it offsets the node's TSC",
    MSR_IA32_TSC_DEADLINE: "restored after the LAPIC",
}
IRQCHIP_IDS = (n.KVM_IRQCHIP_PIC_MASTER, n.KVM_IRQCHIP_PIC_SLAVE, n.KVM_IRQCHIP_IOAPIC)
PIC_MASTER, PIC_SLAVE, IOAPIC = range(3)  # indices into CpuState.irqchips
REDIR_MASKED = 1 << 16  # IOAPIC redirection entry bits
REDIR_REMOTE_IRR = 1 << 14

# LAPIC registers (byte offsets in kvm_lapic_state.regs) and timer modes.
APIC_IRR = 0x200
APIC_LVTT = 0x320
APIC_LVT0 = 0x350
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0
LVT_MASKED = 1 << 16
LVT_DELIVERY_MODE = 7 << 8
LVT_EXTINT = 7 << 8
LVT_TIMER_MODE = 3 << 17
LVT_TIMER_TSC_DEADLINE = 2 << 17
APIC_BUS_NS = 1  # KVM's LAPIC timer counts at 1 GHz before the divider


def _words(lapic: s.kvm_lapic_state) -> ctypes.Array[ctypes.c_uint32]:
    # A c_char array field reads as a bytes copy; this is a writable view instead.
    return (ctypes.c_uint32 * 256).from_buffer(lapic)


def lapic_reg(lapic: s.kvm_lapic_state, offset: int) -> int:
    return _words(lapic)[offset // 4]


def set_lapic_reg(lapic: s.kvm_lapic_state, offset: int, value: int) -> None:
    _words(lapic)[offset // 4] = value


def timer_ns_per_count(lapic: s.kvm_lapic_state) -> int:
    tdcr = lapic_reg(lapic, APIC_TDCR)
    return APIC_BUS_NS << ((((tdcr & 3) | ((tdcr & 8) >> 1)) + 1) & 7)


def advance_lapic_timer(lapic: s.kvm_lapic_state, elapsed_ns: int) -> None:
    """Let a one-shot or periodic LAPIC timer count down through ``elapsed_ns``.

    A saved LAPIC holds the timer's current count; restored as is, the timer would
    stand still while its instance was switched out, though the TSC went on. Guests
    calibrate one against the other, so that is not transparent. An overdue timer
    fires at once (missed periodic ticks coalesce into one, as for a descheduled
    CPU). TSC-deadline timers are absolute and need nothing.
    """
    # A masked timer still counts (guests calibrate with one), only its interrupt is off.
    if lapic_reg(lapic, APIC_LVTT) & LVT_TIMER_MODE == LVT_TIMER_TSC_DEADLINE:
        return
    current = lapic_reg(lapic, APIC_TMCCT)
    if not current or not lapic_reg(lapic, APIC_TMICT):
        return
    counted = elapsed_ns // timer_ns_per_count(lapic)
    set_lapic_reg(lapic, APIC_TMCCT, max(1, current - counted))


def copy_state(state: CpuState) -> CpuState:
    """An independent copy (a new instance starts from a copy of the pristine state)."""
    copied = CpuState()
    for name in CpuState.__slots__:
        value = getattr(state, name)
        if isinstance(value, list):
            value = [type(chip).from_buffer_copy(chip) for chip in value]
        elif isinstance(value, dict):
            value = dict(value)
        elif hasattr(value, "_fields_"):
            value = type(value).from_buffer_copy(value)
        setattr(copied, name, value)
    return copied


class CpuState:
    """One instance's saved vCPU and interrupt-controller state."""

    __slots__ = (
        "debugregs",
        "events",
        "irqchips",
        "lapic",
        "mp_state",
        "msrs",
        "pit",
        "regs",
        "saved_ns",
        "sregs",
        "tsc",
        "tsc_deadline",
        "xcrs",
        "xsave",
    )

    def __init__(self) -> None:
        self.regs = s.kvm_regs()
        self.sregs = s.kvm_sregs()
        self.xsave = s.kvm_xsave()
        self.xcrs = s.kvm_xcrs()
        self.lapic = s.kvm_lapic_state()
        self.events = s.kvm_vcpu_events()
        self.debugregs = s.kvm_debugregs()
        self.mp_state = n.KVM_MP_STATE_RUNNABLE
        self.msrs: dict[int, int] = {}
        self.tsc_deadline = 0
        self.tsc = 0  # guest TSC when saved: read only, to know when its timer is due
        self.saved_ns = 0  # host monotonic time of the save
        self.irqchips = [s.kvm_irqchip(chip_id=chip) for chip in IRQCHIP_IDS]
        self.pit = s.kvm_pit_state2()


def switched_msrs(vcpu: Vcpu, index_list: Iterable[int]) -> tuple[list[int], dict[int, str]]:
    """The MSRs a world switch saves and restores: every MSR that KVM lists as savable
    (KVM_GET_MSR_INDEX_LIST), but the clock's, that reads and writes back on this
    vCPU; and the ones left out, with why. Call before the guest runs: it writes each
    MSR's current value back."""
    chosen: list[int] = []
    left_out: dict[int, str] = {}
    for index in index_list:
        if index in NOT_SWITCHED:
            left_out[index] = NOT_SWITCHED[index]
            continue
        try:
            value = vcpu.get_msrs((index,))[index]
        except OSError as exc:
            left_out[index] = f"KVM cannot read it here ({exc})"
            continue
        try:
            vcpu.set_msrs({index: value})
        except OSError as exc:
            left_out[index] = f"KVM cannot restore it here ({exc})"
            continue
        chosen.append(index)
    unexpected = {m: why for m, why in left_out.items() if m not in NOT_SWITCHED}
    if unexpected:
        log.warning(
            "MSRs not switched between instances: %s",
            ", ".join(f"{m:#x} ({why})" for m, why in unexpected.items()),
        )
    return chosen, left_out


class StateSwitcher:
    """Saves and restores ``CpuState`` on one vCPU, reusing buffers (no allocation)."""

    def __init__(self, vm: Vm, vcpu: Vcpu, msr_index_list: list[int]) -> None:
        self.vm = vm
        self.vcpu = vcpu
        msrs, self.msrs_left_out = switched_msrs(vcpu, msr_index_list)
        self.msrs = tuple(msrs)
        supported_msrs = set(msr_index_list)
        self.has_tsc_deadline = MSR_IA32_TSC_DEADLINE in supported_msrs
        extra = (MSR_IA32_TSC_DEADLINE,) if self.has_tsc_deadline else ()
        self._saved_msrs = (*self.msrs, *extra, MSR_IA32_TSC)

    def save(self, state: CpuState) -> None:
        vcpu, vm = self.vcpu, self.vm
        vcpu.get_regs(state.regs)
        vcpu.get_sregs(state.sregs)
        vcpu.get_xsave(state.xsave)
        vcpu.get_xcrs(state.xcrs)
        vcpu.get_lapic(state.lapic)
        vcpu.get_vcpu_events(state.events)
        vcpu.get_debugregs(state.debugregs)
        state.mp_state = vcpu.get_mp_state()
        values = vcpu.get_msrs(self._saved_msrs)
        state.tsc_deadline = values.pop(MSR_IA32_TSC_DEADLINE, 0)
        state.tsc = values.pop(MSR_IA32_TSC, 0)
        state.msrs = values
        for chip in state.irqchips:
            vm.get_irqchip(chip.chip_id, chip)
        vm.get_pit2(state.pit)
        state.saved_ns = time.monotonic_ns()

    def restore(self, state: CpuState) -> None:
        vcpu, vm = self.vcpu, self.vm
        vcpu.set_regs(state.regs)
        vcpu.set_xsave(state.xsave)
        vcpu.set_xcrs(state.xcrs)
        vcpu.set_sregs(state.sregs)
        if state.msrs:
            vcpu.set_msrs(state.msrs)
        vcpu.set_mp_state(state.mp_state)
        if state.saved_ns:
            advance_lapic_timer(state.lapic, time.monotonic_ns() - state.saved_ns)
            state.saved_ns = 0  # advanced once: a second restore must not advance again
        vcpu.set_lapic(state.lapic)
        for chip in state.irqchips:
            vm.set_irqchip(chip)
        vm.set_pit2(state.pit)
        if self.has_tsc_deadline:
            vcpu.set_msrs({MSR_IA32_TSC_DEADLINE: state.tsc_deadline})
        vcpu.set_vcpu_events(state.events)
        vcpu.set_debugregs(state.debugregs)
