from __future__ import annotations

import mmap
import os

import pytest

from pyvmm import memory
from pyvmm.errors import MemoryAccessError
from pyvmm.memory import GuestMemory

MiB = 1 << 20


def test_read_write_and_numpy_view_share_memory():
    with GuestMemory(4 * MiB) as mem:
        mem.write(0x1000, b"hello")
        assert mem.read(0x1000, 5) == b"hello"
        array = mem.array(0x1000, 5)
        assert bytes(array) == b"hello"
        array[0] = ord("j")
        assert mem.read(0x1000, 5) == b"jello"
        mem.write_u64(0x2000, 0x1122334455667788)
        assert mem.read_u32(0x2004) == 0x11223344


@pytest.mark.parametrize(("gpa", "length"), [(-1, 1), (4 * MiB - 1, 2), (4 * MiB, 1), (0, -1)])
def test_out_of_bounds_access_is_refused(gpa, length):
    with GuestMemory(4 * MiB) as mem, pytest.raises(MemoryAccessError, match="outside guest RAM"):
        mem.read(gpa, length)


def test_partitions_split_memory_evenly_and_align():
    with GuestMemory(8 * MiB, partitions=2) as mem:
        assert [(p.base, p.size) for p in mem.partitions] == [(0, 4 * MiB), (4 * MiB, 4 * MiB)]
    with pytest.raises(MemoryAccessError, match="multiple"):
        GuestMemory(3 * MiB, partitions=2)


# every backing this host can give (reserved huge pages only where some are free)
BACKINGS = [b for b in memory.BACKINGS if b != memory.MEMFD_HUGETLB]
if memory.free_huge_pages() >= 8 * MiB:
    BACKINGS.append(memory.MEMFD_HUGETLB)


@pytest.mark.parametrize("backing", BACKINGS)
def test_discard_zeroes_exactly_the_range_and_keeps_the_rest(backing):
    with GuestMemory(8 * MiB, backing=backing) as mem:
        mem.fill(0, 8 * MiB, 0xAB)
        start, length = 3 * MiB - 100, 2 * MiB + 300  # ragged at both ends
        mem.discard(start, length)
        data = mem.array()
        assert not data[start : start + length].any()
        assert (data[:start] == 0xAB).all() and (data[start + length :] == 0xAB).all()
        mem.write(start, b"again")  # dropped pages come back on use
        assert mem.read(start, 5) == b"again"
        with pytest.raises(MemoryAccessError):
            mem.discard(7 * MiB, 2 * MiB)


def other_process_view(mem: GuestMemory) -> mmap.mmap:
    """Guest RAM as a back-end process maps it: the memfd, mapped again."""
    return mmap.mmap(mem.fd, mem.size, mmap.MAP_SHARED)


@pytest.mark.parametrize("backing", [b for b in BACKINGS if b != memory.ANONYMOUS])
def test_a_wiped_partition_reads_as_zeros_in_every_mapping(backing):
    with GuestMemory(8 * MiB, partitions=2, backing=backing) as mem:
        shared = other_process_view(mem)
        mem.fill(0, 8 * MiB, 0x5A)
        assert shared[4 * MiB : 4 * MiB + 4] == b"\x5a" * 4  # one RAM, two mappings
        old = mem.partitions[1]
        mem.discard(old.base, old.size)
        assert shared[old.base : old.end] == bytes(old.size)
        assert not mem.array(old.base, old.size).any()
        assert shared[: old.base] == b"\x5a" * old.base  # the other partition is untouched
        shared.close()


def test_madv_dontneed_alone_would_not_wipe_shared_memory():
    """Why discard punches holes: on a shared mapping MADV_DONTNEED drops only this
    mapping's page-table entries and the data comes back from the file."""
    with GuestMemory(4 * MiB, backing=memory.MEMFD_4K) as mem:
        mem.fill(0, 4 * MiB, 0x77)
        assert memory._libc.madvise(mem.host_address, 4 * MiB, memory._MADV_DONTNEED) == 0
        assert mem.read(0, 4) == b"\x77" * 4


def test_memfd_is_sealed_against_shrinking():
    with GuestMemory(4 * MiB, backing=memory.MEMFD_4K) as mem:
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 2 * MiB)
        assert os.fstat(mem.fd).st_size == 4 * MiB
    assert mem.fd == -1


def test_backing_follows_the_host_and_the_override(monkeypatch):
    monkeypatch.delenv("PYVMM_GUEST_RAM", raising=False)
    monkeypatch.setattr(memory, "free_huge_pages", lambda: 0)
    cases = [
        ("advise", memory.MEMFD_THP),
        ("always", memory.MEMFD_THP),
        ("never", memory.ANONYMOUS),
    ]
    for mode, expected in cases:
        monkeypatch.setattr(memory, "shmem_thp_mode", lambda mode=mode: mode)
        assert memory.choose_backing(8 * MiB) == expected
    assert memory.choose_backing(8 * MiB, shared=True) == memory.MEMFD_4K
    monkeypatch.setattr(memory, "free_huge_pages", lambda: 16 * MiB)
    assert memory.choose_backing(8 * MiB) == memory.MEMFD_HUGETLB
    assert memory.choose_backing(32 * MiB) == memory.ANONYMOUS  # not enough reserved
    monkeypatch.setenv("PYVMM_GUEST_RAM", "anonymous")
    assert memory.choose_backing(8 * MiB) == memory.ANONYMOUS
    with GuestMemory(4 * MiB) as mem:
        assert (mem.backing, mem.fd) == (memory.ANONYMOUS, -1)
    monkeypatch.setenv("PYVMM_GUEST_RAM", "bogus")
    with pytest.raises(MemoryAccessError, match="PYVMM_GUEST_RAM"):
        GuestMemory(4 * MiB)


def test_shared_ram_on_4k_pages_warns(monkeypatch, capsys):
    monkeypatch.delenv("PYVMM_GUEST_RAM", raising=False)
    monkeypatch.setattr(memory, "free_huge_pages", lambda: 0)
    monkeypatch.setattr(memory, "shmem_thp_mode", lambda: "never")
    assert memory.choose_backing(8 * MiB) == memory.ANONYMOUS
    assert capsys.readouterr().err == ""
    assert memory.choose_backing(8 * MiB, shared=True) == memory.MEMFD_4K
    assert "4 KiB host pages" in capsys.readouterr().err
