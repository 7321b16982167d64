"""Guest RAM: one mapping, addressed by guest-physical address.

The mapping is a memfd (sealed against shrinking) so that device back-ends in
other processes can map the same RAM, or an anonymous private mapping where shared
memory could only have 4 KiB pages. ``choose_backing`` decides (see its doc).

Every access from the host side goes through bounds checks here, because the
addresses and lengths come from the guest (descriptors, start-info pointers) or
from untrusted kernel images. numpy is imported only when a numpy view is asked
for, which keeps it off the boot path.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
from collections.abc import Iterator

from .errors import MemoryAccessError
from .record import Record

TYPE_CHECKING = False  # typing itself costs boot time (see record.py)
if TYPE_CHECKING:
    import numpy as np

MiB = 1 << 20
GiB = 1 << 30
PARTITION_ALIGN = 2 * MiB

# The 32-bit MMIO hole (virtio windows, IOAPIC, LAPIC) starts here; RAM is kept below it.
MMIO_HOLE_START = 0xC000_0000

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_MAP_FIXED = 0x10
_MADV_DONTNEED = 4
_MADV_DONTFORK = 10
_MADV_HUGEPAGE = 14
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
HUGE_PAGE = 2 * MiB
_BIG_COPY = 64 << 10  # bytes from which a write lets go of the GIL
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value
_THP = "/sys/kernel/mm/transparent_hugepage"

# Backings (GuestMemory.backing)
MEMFD_HUGETLB = "memfd-hugetlb"  # reserved 2 MiB pages (vm.nr_hugepages)
MEMFD_THP = "memfd-thp"  # shmem transparent huge pages (shmem_enabled advise/always)
MEMFD_4K = "memfd-4k"  # shmem with 4 KiB pages: the host allows nothing larger
ANONYMOUS = "anonymous"  # private anonymous memory with THP; not shareable
BACKINGS = (MEMFD_HUGETLB, MEMFD_THP, MEMFD_4K, ANONYMOUS)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def shmem_thp_mode() -> str:
    """The bracketed choice of shmem_enabled ("never" if unknown)."""
    text = _read(f"{_THP}/shmem_enabled")
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "never"


def free_huge_pages() -> int:
    """Bytes of free reserved 2 MiB pages (HugePages_Free)."""
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1]) * HUGE_PAGE
    return 0


def choose_backing(size: int, shared: bool = False) -> str:
    """Guest RAM is a memfd, so back-end processes can map it, with the largest
    pages the host gives shared memory: reserved huge pages when enough are free,
    else shmem THP when shmem_enabled allows madvise (``advise``, ``always``,
    ``within_size``, ``force``). Where shared memory can only have 4 KiB pages, the
    guest pays for them (benchmarks/guest_ram.py: ~18% more CPU for bench.elf's
    memory workloads, docs/decisions.md), so RAM stays anonymous memory with THP
    unless it must be ``shared``; then it is a 4 KiB memfd, with a warning.
    PYVMM_GUEST_RAM=<backing> overrides the choice."""
    wanted = os.environ.get("PYVMM_GUEST_RAM", "")
    if wanted:
        if wanted not in BACKINGS:
            raise MemoryAccessError(f"PYVMM_GUEST_RAM={wanted!r}: not one of {', '.join(BACKINGS)}")
        return wanted
    if free_huge_pages() >= size:
        return MEMFD_HUGETLB
    if shmem_thp_mode() in ("always", "within_size", "advise", "force"):
        return MEMFD_THP
    if not shared:
        return ANONYMOUS
    print(
        "pyvmm: warning: guest RAM on 4 KiB host pages (shmem_enabled is "
        f"{shmem_thp_mode()!r} and no reserved huge pages; see README, Host set-up)",
        file=sys.stderr,
    )
    return MEMFD_4K


def _reserve_aligned(size: int) -> int:
    """An address range of ``size`` bytes at a 2 MiB-aligned host address, reserved
    (anonymous, no access) until something is mapped over it."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    raw = _libc.mmap(None, size + HUGE_PAGE, 0, flags, -1, 0)  # PROT_NONE
    if raw in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise MemoryAccessError(f"cannot map {size >> 20} MiB of guest memory: errno {err}")
    addr = (raw + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    if addr > raw:
        _libc.munmap(raw, addr - raw)
    tail = raw + size + HUGE_PAGE - (addr + size)
    if tail:
        _libc.munmap(addr + size, tail)
    return addr


def _map(addr: int, size: int, flags: int, fd: int) -> None:
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if _libc.mmap(addr, size, prot, flags | _MAP_FIXED, fd, 0) != addr:
        err = ctypes.get_errno()
        _libc.munmap(addr, size)
        raise MemoryAccessError(f"cannot map {size >> 20} MiB of guest memory: errno {err}")


def _map_guest_ram(size: int, backing: str) -> tuple[int, int]:
    """(host address, memfd or -1) of guest RAM at a 2 MiB-aligned address.

    With 2 MiB host pages behind 2 MiB guest pages, a guest's TLB misses cost one
    level less of the nested walk: a random pointer chase over 32 MiB runs ~15% faster.
    """
    addr = _reserve_aligned(size)
    fd = -1
    if backing == ANONYMOUS:
        _map(addr, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1)
    else:
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        if backing == MEMFD_HUGETLB:
            flags |= os.MFD_HUGETLB
        try:
            fd = os.memfd_create("pyvmm-guest-ram", flags)
            os.ftruncate(fd, size)
            # Nobody (a back-end holding the fd) can shrink RAM under the guest.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            _map(addr, size, mmap.MAP_SHARED | _MAP_NORESERVE, fd)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            _libc.munmap(addr, size)
            raise MemoryAccessError(
                f"cannot create {size >> 20} MiB of guest memory: {exc}"
            ) from exc
    if backing in (ANONYMOUS, MEMFD_THP):
        _libc.madvise(addr, size, _MADV_HUGEPAGE)
    # Children (e.g. helper processes) must not inherit guest RAM through fork.
    _libc.madvise(addr, size, _MADV_DONTFORK)
    return addr, fd


class Partition(Record, frozen=True):
    """A range of guest-physical RAM given to one OS instance."""

    index: int
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return length >= 0 and self.base <= gpa and gpa + length <= self.end

    def __str__(self) -> str:
        return f"partition {self.index} [{self.base:#x}-{self.end:#x})"


class MemorySlot(Record, frozen=True):
    """A KVM memory slot: guest-physical [gpa, gpa + size) backed at host_address."""

    slot: int
    gpa: int
    size: int
    host_address: int


class GuestMemory:
    """Guest RAM at guest-physical [0, size), backed by a memfd (``fd``, shareable
    with back-end processes) or by anonymous memory (``fd`` is -1)."""

    def __init__(self, size: int, partitions: int = 1, backing: str | None = None) -> None:
        if size <= 0 or size % (PARTITION_ALIGN * partitions):
            raise MemoryAccessError(
                f"memory size {size:#x} must be a positive multiple of "
                f"{partitions} x 2 MiB partitions"
            )
        if size > MMIO_HOLE_START:
            raise MemoryAccessError(
                f"memory size {size >> 20} MiB exceeds the {MMIO_HOLE_START >> 20} MiB "
                "below the MMIO hole"
            )
        self.size = size
        part_size = size // partitions
        self.partitions = tuple(Partition(i, i * part_size, part_size) for i in range(partitions))
        self.backing = backing or choose_backing(size)
        if self.backing not in BACKINGS:
            raise MemoryAccessError(f"unknown guest RAM backing {self.backing!r}")
        addr, self.fd = _map_guest_ram(size, self.backing)
        self.host_address: int = addr
        self._buffer = (ctypes.c_ubyte * size).from_address(addr)
        self._view = memoryview(self._buffer).cast("B")

    # --- bounds-checked access -------------------------------------------------------

    def check(self, gpa: int, length: int) -> None:
        if length < 0 or gpa < 0 or gpa + length > self.size:
            raise MemoryAccessError(
                f"guest-physical range {gpa:#x}+{length:#x} is outside guest RAM "
                f"[0, {self.size:#x})"
            )

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable window onto guest RAM; no copy."""
        self.check(gpa, length)
        return self._view[gpa : gpa + length]

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return bytes(self._view[gpa : gpa + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.check(gpa, len(data))
        if len(data) >= _BIG_COPY and isinstance(data, bytes):
            # Copying a kernel image into pages not touched before faults them in,
            # which can take tens of ms; through ctypes the other threads (a running
            # instance's devices) go on meanwhile.
            ctypes.memmove(self.host_address + gpa, data, len(data))
        else:
            self._view[gpa : gpa + len(data)] = data

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.check(gpa, length)
        ctypes.memset(self.host_address + gpa, byte, length)

    def discard(self, gpa: int, length: int) -> None:
        """Zero a range and give its pages back to the host. Whole pages are dropped
        (they read as zero and are faulted in again on use, KVM's mappings follow),
        which is instant where writing zeros to a 256 MiB partition takes a core for
        ~100 ms; the partial pages at the ends are zeroed. A memfd's pages are
        punched out of the file (fallocate PUNCH_HOLE): MADV_DONTNEED on a shared
        mapping only unmaps them and the data stays, for every process mapping it."""
        self.check(gpa, length)
        page = HUGE_PAGE if self.backing == MEMFD_HUGETLB else mmap.PAGESIZE
        start, end = -(-gpa // page) * page, (gpa + length) // page * page
        if end <= start:
            self.fill(gpa, length)
            return
        if self.fd >= 0:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            dropped = _libc.fallocate(self.fd, mode, start, end - start) == 0
        else:
            dropped = _libc.madvise(self.host_address + start, end - start, _MADV_DONTNEED) == 0
        if not dropped:
            self.fill(start, end - start)  # cannot happen on shmem or private anonymous memory
        self.fill(gpa, start - gpa)
        self.fill(end, gpa + length - end)

    def read_u32(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 4), "little")

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(4, "little"))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, value.to_bytes(8, "little"))

    def array(self, gpa: int = 0, length: int | None = None) -> np.ndarray:
        """A numpy uint8 view of guest RAM (no copy)."""
        import numpy as np

        length = self.size - gpa if length is None else length
        return np.frombuffer(self.view(gpa, length), dtype=np.uint8)

    def slots(self) -> Iterator[MemorySlot]:
        """The KVM memory slots of guest RAM: one per partition, so that a partition
        can be unmapped from the guest (and mapped again) on its own."""
        for partition in self.partitions:
            yield self.partition_slot(partition)

    def partition_slot(self, partition: Partition) -> MemorySlot:
        """The KVM memory slot that maps ``partition`` (slot number = partition index)."""
        return MemorySlot(
            partition.index, partition.base, partition.size, self.host_address + partition.base
        )

    def partition_writer(self, partition: Partition) -> PartitionMemory:
        return PartitionMemory(self, partition)

    def close(self) -> None:
        """Unmap guest RAM. Views taken earlier must not be used afterwards."""
        if self.host_address:
            try:
                self._view.release()
            except BufferError:
                pass  # a numpy view still exports it; unmapping is still correct at exit
            _libc.munmap(self.host_address, self.size)
            self.host_address = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PartitionMemory:
    """Guest memory as one instance may touch it: only inside its partition.

    The boot loader writes through this, so a hostile image cannot place bytes in
    the other instance's partition.
    """

    def __init__(self, memory: GuestMemory, partition: Partition) -> None:
        self.memory = memory
        self.partition = partition

    def _check(self, gpa: int, length: int) -> None:
        if not self.partition.contains(gpa, length):
            raise MemoryAccessError(
                f"guest-physical range {gpa:#x}+{length:#x} is outside {self.partition}"
            )

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._check(gpa, len(data))
        self.memory.write(gpa, data)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self._check(gpa, length)
        self.memory.fill(gpa, length, byte)

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        return self.memory.read(gpa, length)
