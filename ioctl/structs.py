"""ctypes mirrors of the x86-64 structures in <linux/kvm.h> (and <asm/kvm.h>).

Field names follow the C headers so that the ABI test can compare offsets by name.
Variable-length structures (msrs, msr_list, cpuid2, irq_routing) have a fixed header
type, whose size is what the request number encodes, and a factory that builds a
type with room for ``n`` entries.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    c_char,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from functools import cache

u8, u16, u32, u64, s32, s64 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32, c_int64


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name, *_ in self._fields_)
        return f"{type(self).__name__}({fields})"


# --- registers -------------------------------------------------------------------


class kvm_regs(_Struct):
    _fields_ = [
        (name, u64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    ]


class kvm_segment(_Struct):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(_Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_Struct):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(_Struct):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_xsave(_Struct):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(_Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(_Struct):
    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class kvm_debugregs(_Struct):
    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class kvm_mp_state(_Struct):
    _fields_ = [("mp_state", u32)]


class kvm_lapic_state(_Struct):
    _fields_ = [("regs", c_char * 1024)]


# --- MSRs and CPUID (variable length) ---------------------------------------------


class kvm_msr_entry(_Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_Struct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(_Struct):
    _fields_ = [("nmsrs", u32)]


class kvm_cpuid_entry2(_Struct):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(_Struct):
    _fields_ = [("nent", u32), ("padding", u32)]


@cache
def kvm_msrs_with(n: int) -> type[ctypes.Structure]:
    """kvm_msrs followed by room for ``n`` entries."""
    return type(
        f"kvm_msrs_{n}",
        (_Struct,),
        {"_fields_": [*kvm_msrs._fields_, ("entries", kvm_msr_entry * n)]},
    )


@cache
def kvm_msr_list_with(n: int) -> type[ctypes.Structure]:
    return type(
        f"kvm_msr_list_{n}",
        (_Struct,),
        {"_fields_": [*kvm_msr_list._fields_, ("indices", u32 * n)]},
    )


@cache
def kvm_cpuid2_with(n: int) -> type[ctypes.Structure]:
    return type(
        f"kvm_cpuid2_{n}",
        (_Struct,),
        {"_fields_": [*kvm_cpuid2._fields_, ("entries", kvm_cpuid_entry2 * n)]},
    )


# --- vCPU events, debugging -------------------------------------------------------


class _events_exception(_Struct):
    _fields_ = [
        ("injected", u8),
        ("nr", u8),
        ("has_error_code", u8),
        ("pending", u8),
        ("error_code", u32),
    ]


class _events_interrupt(_Struct):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _events_nmi(_Struct):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _events_smi(_Struct):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _events_triple_fault(_Struct):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(_Struct):
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _events_smi),
        ("triple_fault", _events_triple_fault),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_guest_debug_arch(_Struct):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(_Struct):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


# --- memory -----------------------------------------------------------------------


class kvm_userspace_memory_region(_Struct):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class _dirty_log_bitmap(ctypes.Union):
    _fields_ = [("dirty_bitmap", c_void_p), ("padding2", u64)]


class kvm_dirty_log(_Struct):
    _anonymous_ = ("u",)
    _fields_ = [("slot", u32), ("padding1", u32), ("u", _dirty_log_bitmap)]


# --- interrupt controllers and timers ---------------------------------------------


class kvm_pic_state(_Struct):
    _fields_ = [
        (name, u8)
        for name in [
            "last_irr",
            "irr",
            "imr",
            "isr",
            "priority_add",
            "irq_base",
            "read_reg_select",
            "poll",
            "special_mask",
            "init_state",
            "auto_eoi",
            "rotate_on_auto_eoi",
            "special_fully_nested_mode",
            "init4",
            "elcr",
            "elcr_mask",
        ]
    ]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(_Struct):
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS),
    ]


class _irqchip_union(ctypes.Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(_Struct):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_union)]


class kvm_pit_config(_Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_pit_channel_state(_Struct):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", s64),
    ]


class kvm_pit_state2(_Struct):
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", u32),
        ("reserved", u32 * 9),
    ]


class kvm_irq_level(_Struct):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_irqfd(_Struct):
    _fields_ = [
        ("fd", u32),
        ("gsi", u32),
        ("flags", u32),
        ("resamplefd", u32),
        ("pad", u8 * 16),
    ]


class kvm_ioeventfd(_Struct):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_msi(_Struct):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


class kvm_irq_routing_irqchip(_Struct):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(_Struct):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _routing_union(ctypes.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", u32 * 8),
    ]


class kvm_irq_routing_entry(_Struct):
    _fields_ = [
        ("gsi", u32),
        ("type", u32),
        ("flags", u32),
        ("pad", u32),
        ("u", _routing_union),
    ]


class kvm_irq_routing(_Struct):
    _fields_ = [("nr", u32), ("flags", u32)]


@cache
def kvm_irq_routing_with(n: int) -> type[ctypes.Structure]:
    return type(
        f"kvm_irq_routing_{n}",
        (_Struct,),
        {"_fields_": [*kvm_irq_routing._fields_, ("entries", kvm_irq_routing_entry * n)]},
    )


class kvm_enable_cap(_Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_clock_data(_Struct):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


# --- kvm_run: the shared page between KVM_RUN and userspace -----------------------


class kvm_run_io(_Struct):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class kvm_run_mmio(_Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(_Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(_Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(_Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_msr(_Struct):
    _fields_ = [
        ("error", u8),
        ("pad", u8 * 7),
        ("reason", u32),
        ("index", u32),
        ("data", u64),
    ]


class kvm_run_hw(_Struct):
    _fields_ = [("hardware_exit_reason", u64)]


class kvm_run_debug(_Struct):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class _kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("debug", kvm_run_debug),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("msr", kvm_run_msr),
        ("padding", c_char * 256),
    ]


class kvm_run(_Struct):
    _anonymous_ = ("exit",)
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", _kvm_run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", c_char * 2048),
    ]
