"""The world switch's MSRs on a real vCPU: every savable MSR, paravirtual ones too."""

from __future__ import annotations

import pytest

from pyvmm.cpu_state import MSR_IA32_TSC, CpuState, StateSwitcher
from pyvmm.machine import Machine

pytestmark = pytest.mark.kvm
MiB = 1 << 20
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01  # kvmclock
MSR_KVM_POLL_CONTROL = 0x4B564D05
SYSENTER_EIP = 0x176


def test_msrs_the_guest_writes_travel_with_their_instance():
    with Machine(64 * MiB, console=lambda b: None) as m:
        switcher = StateSwitcher(m.vm, m.vcpu, m.kvm.msr_index_list())
        assert MSR_KVM_SYSTEM_TIME_NEW in switcher.msrs and MSR_IA32_TSC not in switcher.msrs
        a, b = CpuState(), CpuState()
        switcher.save(a)
        b_values = {SYSENTER_EIP: 0xFFFF_8000_1234_0000, MSR_KVM_SYSTEM_TIME_NEW: 0x2001}
        if MSR_KVM_POLL_CONTROL in switcher.msrs:
            b_values[MSR_KVM_POLL_CONTROL] = 0  # 1 after reset
        m.vcpu.set_msrs(b_values)
        switcher.save(b)
        assert {k: b.msrs[k] for k in b_values} == b_values
        switcher.restore(a)
        now = m.vcpu.get_msrs(switcher.msrs)
        assert now == a.msrs and now[MSR_KVM_SYSTEM_TIME_NEW] == 0
        switcher.restore(b)
        assert m.vcpu.get_msrs(b_values) == b_values


def test_an_unreadable_msr_is_reported_not_dropped():
    with Machine(64 * MiB, console=lambda b: None) as m, pytest.raises(OSError, match="0xdeadbeef"):
        m.vcpu.get_msrs([SYSENTER_EIP, 0xDEADBEEF, 0x174])
