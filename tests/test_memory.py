from __future__ import annotations

import pytest

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


def test_discard_zeroes_exactly_the_range_and_keeps_the_rest():
    with GuestMemory(8 * MiB) as mem:
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
