"""Thin wrappers over the /dev/kvm, VM and vCPU file descriptors.

Each method is one ioctl with typed arguments. Capability checks happen once, at
start-up, so that a missing feature is a clear message instead of an EINVAL later.
"""

from __future__ import annotations

# _signal is what the signal module wraps; the wrapper's enum import costs boot time.
import _signal
import ctypes
import errno
import fcntl
import functools
import mmap
import os
import threading
from collections.abc import Iterable

from ioctl import kvm_error
from ioctl import numbers as n
from ioctl import structs as s

from .errors import HostPermissionDenied, HostUnsupported

# The signal that kicks a vCPU out of KVM_RUN. Its handler does nothing: the point
# is the EINTR, with kvm_run.immediate_exit covering a kick that lands outside KVM_RUN.
KICK_SIGNAL = _signal.SIGRTMIN + 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int

_REQUEST_NAMES = {
    value: name
    for name, value in vars(n).items()
    if name.startswith("KVM_") and isinstance(value, int) and value > 0xFFFF
}

REQUIRED_CAPS = {
    n.KVM_CAP_USER_MEMORY: "user memory",
    n.KVM_CAP_SET_TSS_ADDR: "TSS address",
    n.KVM_CAP_IRQCHIP: "in-kernel irqchip",
    n.KVM_CAP_PIT2: "in-kernel PIT",
    n.KVM_CAP_IRQFD: "irqfd",
    n.KVM_CAP_IOEVENTFD: "ioeventfd",
    n.KVM_CAP_IMMEDIATE_EXIT: "immediate_exit",
    n.KVM_CAP_EXT_CPUID: "KVM_GET_SUPPORTED_CPUID",
}


def _request_name(request: int) -> str:
    return _REQUEST_NAMES.get(request, f"ioctl {request:#x}")


def _ioctl(fd: int, request: int, arg: ctypes.Structure | int = 0) -> int:
    try:
        return (
            fcntl.ioctl(fd, request, arg, True)
            if not isinstance(arg, int)
            else (fcntl.ioctl(fd, request, arg))
        )
    except InterruptedError:
        raise
    except OSError as exc:
        raise kvm_error(exc.errno or errno.EIO, _request_name(request)) from None


def _ioctl_ulong(fd: int, request: int, value: int) -> int:
    """For integer arguments above INT_MAX, which fcntl.ioctl refuses."""
    result = _libc.ioctl(fd, request, value)
    if result < 0:
        raise kvm_error(ctypes.get_errno(), _request_name(request))
    return result


class _Fd:
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, request: int, struct_type, into=None):
        """Fill ``into`` (a reused buffer) or a new ``struct_type`` with one get-ioctl."""
        value = struct_type() if into is None else into
        _ioctl(self.fd, request, value)
        return value


class Kvm(_Fd):
    """/dev/kvm."""

    def __init__(self, path: str | None = None) -> None:
        # PYVMM_KVM_DEVICE lets tests and unusual hosts point at another device node.
        path = path or os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HostUnsupported(
                f"{path} not found: this host has no KVM (load kvm_intel/kvm_amd, or run "
                "on a machine with virtualization enabled)"
            ) from None
        except PermissionError:
            raise HostPermissionDenied(
                f"permission denied opening {path}: add this user to the 'kvm' group or run as root"
            ) from None
        except OSError as exc:
            raise HostUnsupported(f"cannot open {path}: {exc.strerror}") from None
        version = _ioctl(self.fd, n.KVM_GET_API_VERSION)
        if version != n.KVM_API_VERSION:
            self.close()
            raise HostUnsupported(f"KVM API version {version}, expected {n.KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, n.KVM_CHECK_EXTENSION, cap)

    def require(self, caps: dict[int, str] = REQUIRED_CAPS) -> None:
        missing = [name for cap, name in caps.items() if not self.check_extension(cap)]
        if missing:
            raise HostUnsupported(f"KVM lacks required features: {', '.join(missing)}")

    @property
    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, n.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> ctypes.Structure:
        count = n.KVM_MAX_CPUID_ENTRIES
        while True:
            cpuid = s.kvm_cpuid2_with(count)()
            cpuid.nent = count
            try:
                _ioctl(self.fd, n.KVM_GET_SUPPORTED_CPUID, cpuid)
                return cpuid
            except OSError as exc:
                if exc.errno != errno.E2BIG or count > 4096:
                    raise
                count *= 2

    def msr_index_list(self) -> list[int]:
        msrs = s.kvm_msr_list_with(1024)()
        msrs.nmsrs = 1024
        _ioctl(self.fd, n.KVM_GET_MSR_INDEX_LIST, msrs)
        return list(msrs.indices[: msrs.nmsrs])

    def create_vm(self) -> Vm:
        return Vm(self, _ioctl(self.fd, n.KVM_CREATE_VM, 0))


class Vm(_Fd):
    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, n.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        region = s.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, host_addr)
        _ioctl(self.fd, n.KVM_SET_USER_MEMORY_REGION, region)

    def delete_memory_region(self, slot: int) -> None:
        """Remove a memory slot (a region of size 0); the host memory stays as it is."""
        region = s.kvm_userspace_memory_region(slot, 0, 0, 0, 0)
        _ioctl(self.fd, n.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, address: int) -> None:
        _ioctl_ulong(self.fd, n.KVM_SET_TSS_ADDR, address)

    def set_identity_map_addr(self, address: int) -> None:
        _ioctl(self.fd, n.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(address))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, n.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        _ioctl(self.fd, n.KVM_CREATE_PIT2, s.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, n.KVM_IRQ_LINE, s.kvm_irq_level(irq, level))

    def irqfd(self, eventfd: int, gsi: int, deassign: bool = False) -> None:
        flags = n.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _ioctl(self.fd, n.KVM_IRQFD, s.kvm_irqfd(fd=eventfd, gsi=gsi, flags=flags))

    def ioeventfd(
        self,
        eventfd: int,
        address: int,
        length: int,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        flags = (n.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            n.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        if datamatch is not None:
            flags |= n.KVM_IOEVENTFD_FLAG_DATAMATCH
        request = s.kvm_ioeventfd(
            datamatch=datamatch or 0, addr=address, len=length, fd=eventfd, flags=flags
        )
        _ioctl(self.fd, n.KVM_IOEVENTFD, request)

    def get_irqchip(self, chip_id: int, into: s.kvm_irqchip | None = None) -> s.kvm_irqchip:
        chip = s.kvm_irqchip(chip_id=chip_id) if into is None else into
        chip.chip_id = chip_id
        _ioctl(self.fd, n.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        _ioctl(self.fd, n.KVM_SET_IRQCHIP, chip)

    def get_pit2(self, into: s.kvm_pit_state2 | None = None) -> s.kvm_pit_state2:
        return self._get(n.KVM_GET_PIT2, s.kvm_pit_state2, into)

    def set_pit2(self, state: s.kvm_pit_state2) -> None:
        _ioctl(self.fd, n.KVM_SET_PIT2, state)

    def get_clock(self) -> s.kvm_clock_data:
        return self._get(n.KVM_GET_CLOCK, s.kvm_clock_data)

    def create_vcpu(self, index: int = 0) -> Vcpu:
        return Vcpu(self, _ioctl(self.fd, n.KVM_CREATE_VCPU, index), index)


def _ignore_signal(signum: int, frame: object) -> None:
    pass


def install_kick_handler() -> None:
    """Make KICK_SIGNAL interrupt KVM_RUN instead of killing the process.

    Python only installs handlers from the main thread, so the machine calls this
    once during start-up.
    """
    if _signal.getsignal(KICK_SIGNAL) is not _ignore_signal:
        _signal.signal(KICK_SIGNAL, _ignore_signal)


class Vcpu(_Fd):
    def __init__(self, vm: Vm, fd: int, index: int) -> None:
        self.vm = vm
        self.fd = fd
        self.index = index
        size = vm.kvm.vcpu_mmap_size
        self._run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.kvm_run = s.kvm_run.from_buffer(self._run_map)
        # The page as bytes, for port-I/O data at kvm_run.io.data_offset.
        self.run_page = memoryview(self._run_map)
        self.thread_id: int | None = None
        self._kick_lock = threading.Lock()

    # --- running ---------------------------------------------------------------------

    def run(self) -> None:
        """One KVM_RUN. Raises InterruptedError when kicked."""
        fcntl.ioctl(self.fd, n.KVM_RUN, 0)

    def runner(self) -> functools.partial[int]:
        """``run`` as a C-level callable, for the run loop: one Python frame less per exit."""
        return functools.partial(fcntl.ioctl, self.fd, n.KVM_RUN, 0)

    def kick(self) -> None:
        """Force the vCPU out of KVM_RUN soon; safe from any thread."""
        with self._kick_lock:
            if self.fd < 0:
                return
            self.kvm_run.immediate_exit = 1
            if self.thread_id is not None:
                _signal.pthread_kill(self.thread_id, KICK_SIGNAL)

    # --- state -----------------------------------------------------------------------

    def get_regs(self, into: s.kvm_regs | None = None) -> s.kvm_regs:
        return self._get(n.KVM_GET_REGS, s.kvm_regs, into)

    def set_regs(self, regs: s.kvm_regs) -> None:
        _ioctl(self.fd, n.KVM_SET_REGS, regs)

    def get_sregs(self, into: s.kvm_sregs | None = None) -> s.kvm_sregs:
        return self._get(n.KVM_GET_SREGS, s.kvm_sregs, into)

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        _ioctl(self.fd, n.KVM_SET_SREGS, sregs)

    def get_fpu(self, into: s.kvm_fpu | None = None) -> s.kvm_fpu:
        return self._get(n.KVM_GET_FPU, s.kvm_fpu, into)

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        _ioctl(self.fd, n.KVM_SET_FPU, fpu)

    def get_xsave(self, into: s.kvm_xsave | None = None) -> s.kvm_xsave:
        return self._get(n.KVM_GET_XSAVE, s.kvm_xsave, into)

    def set_xsave(self, xsave: s.kvm_xsave) -> None:
        _ioctl(self.fd, n.KVM_SET_XSAVE, xsave)

    def get_xcrs(self, into: s.kvm_xcrs | None = None) -> s.kvm_xcrs:
        return self._get(n.KVM_GET_XCRS, s.kvm_xcrs, into)

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        _ioctl(self.fd, n.KVM_SET_XCRS, xcrs)

    def get_lapic(self, into: s.kvm_lapic_state | None = None) -> s.kvm_lapic_state:
        return self._get(n.KVM_GET_LAPIC, s.kvm_lapic_state, into)

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        _ioctl(self.fd, n.KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self, into: s.kvm_vcpu_events | None = None) -> s.kvm_vcpu_events:
        return self._get(n.KVM_GET_VCPU_EVENTS, s.kvm_vcpu_events, into)

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        _ioctl(self.fd, n.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self, into: s.kvm_debugregs | None = None) -> s.kvm_debugregs:
        return self._get(n.KVM_GET_DEBUGREGS, s.kvm_debugregs, into)

    def set_debugregs(self, debugregs: s.kvm_debugregs) -> None:
        _ioctl(self.fd, n.KVM_SET_DEBUGREGS, debugregs)

    def get_mp_state(self) -> int:
        return self._get(n.KVM_GET_MP_STATE, s.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, n.KVM_SET_MP_STATE, s.kvm_mp_state(state))

    def tsc_khz(self) -> int:
        return _ioctl(self.fd, n.KVM_GET_TSC_KHZ)

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        _ioctl(self.fd, n.KVM_SET_CPUID2, cpuid)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        wanted = list(indices)
        msrs = s.kvm_msrs_with(len(wanted))()
        msrs.nmsrs = len(wanted)
        for entry, index in zip(msrs.entries, wanted, strict=True):
            entry.index = index
        got = _ioctl(self.fd, n.KVM_GET_MSRS, msrs)
        if got != len(wanted):  # KVM stops at the first MSR it cannot read
            raise kvm_error(errno.EINVAL, f"KVM_GET_MSRS (MSR {wanted[got]:#x} unreadable)")
        return {entry.index: entry.data for entry in msrs.entries}

    def set_msrs(self, values: dict[int, int]) -> None:
        msrs = s.kvm_msrs_with(len(values))()
        msrs.nmsrs = len(values)
        for entry, (index, data) in zip(msrs.entries, values.items(), strict=True):
            entry.index, entry.data = index, data
        done = _ioctl(self.fd, n.KVM_SET_MSRS, msrs)
        if done != len(values):
            failed = list(values)[done]
            raise kvm_error(errno.EINVAL, f"KVM_SET_MSRS (MSR {failed:#x})")

    def close(self) -> None:
        with self._kick_lock:
            if self.fd < 0:
                return
            del self.kvm_run
            try:
                self.run_page.release()
                self._run_map.close()
            except BufferError:
                # A view of kvm_run outlives us (e.g. held by a traceback). The mapping
                # goes with the process; the vCPU fd must still be closed.
                pass
            super().close()
