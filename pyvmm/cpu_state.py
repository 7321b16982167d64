"""Complete vCPU state, saved and restored as a whole: a world switch between OS
instances, or a newly started instance beginning from the pristine state.

Everything a guest can observe is here: registers, segment and control registers,
xsave (FPU/SSE/AVX), XCRs, the MSRs that carry OS state, the LAPIC with its timer,
pending events, debug registers and the multiprocessing state. The VM-wide
interrupt controllers and PIT are per instance too, because each OS programs them.

Restore order follows what KVM requires: LAPIC mode before the TSC deadline MSR,
sregs (with APIC base) before the LAPIC, events last so a pending exception or
interrupt is injected into the restored context.
"""

from __future__ import annotations

from ioctl import numbers as n
from ioctl import structs as s

from .kvm import Vcpu, Vm

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
# MSRs that hold OS state. EFER and APIC_BASE travel in sregs; FS/GS base in the
# segment registers; the TSC itself is shared time and is never rewound.
STATE_MSRS = (
    0x174,  # SYSENTER_CS
    0x175,  # SYSENTER_ESP
    0x176,  # SYSENTER_EIP
    0x277,  # PAT
    0xC0000081,  # STAR
    0xC0000082,  # LSTAR
    0xC0000083,  # CSTAR
    0xC0000084,  # SFMASK
    0xC0000102,  # KERNEL_GS_BASE
    0xC0000103,  # TSC_AUX
    0x1A0,  # MISC_ENABLE
)
IRQCHIP_IDS = (n.KVM_IRQCHIP_PIC_MASTER, n.KVM_IRQCHIP_PIC_SLAVE, n.KVM_IRQCHIP_IOAPIC)


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
        self.irqchips = [s.kvm_irqchip(chip_id=chip) for chip in IRQCHIP_IDS]
        self.pit = s.kvm_pit_state2()


class StateSwitcher:
    """Saves and restores ``CpuState`` on one vCPU, reusing buffers (no allocation)."""

    def __init__(self, vm: Vm, vcpu: Vcpu, supported_msrs: set[int]) -> None:
        self.vm = vm
        self.vcpu = vcpu
        self.msrs = tuple(m for m in STATE_MSRS if m in supported_msrs)
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

    def restore(self, state: CpuState) -> None:
        vcpu, vm = self.vcpu, self.vm
        for chip in state.irqchips:
            vm.set_irqchip(chip)
        vm.set_pit2(state.pit)
        vcpu.set_regs(state.regs)
        vcpu.set_xsave(state.xsave)
        vcpu.set_xcrs(state.xcrs)
        vcpu.set_sregs(state.sregs)
        if state.msrs:
            vcpu.set_msrs(state.msrs)
        vcpu.set_mp_state(state.mp_state)
        vcpu.set_lapic(state.lapic)
        if self.has_tsc_deadline:
            vcpu.set_msrs({MSR_IA32_TSC_DEADLINE: state.tsc_deadline})
        vcpu.set_vcpu_events(state.events)
        vcpu.set_debugregs(state.debugregs)
