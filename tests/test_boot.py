"""The boot layer without KVM: ELF parsing, placement, start-info, entry state."""

from __future__ import annotations

import random
import struct

import pytest
from elf_builder import ElfSpec, LoadSegment, Note, pvh_entry_note, simple_kernel

from pyvmm.boot import load_kernel, parse_kernel
from pyvmm.boot.layout import place
from pyvmm.boot.start_info import HVM_START_MAGIC, START_INFO, parse_memmap
from pyvmm.errors import BootError, MemoryAccessError
from pyvmm.memory import GuestMemory, Partition

MiB = 1 << 20


@pytest.fixture
def memory():
    with GuestMemory(64 * MiB, partitions=2) as mem:
        yield mem


def test_parses_elf64_relocatable_kernel():
    image = parse_kernel(simple_kernel())
    assert image.elf_class == 64
    assert image.entry == 0x200010
    assert image.reloc is not None and image.reloc.align == 0x200000
    assert image.low == 0x200000 and image.span == 0x4000


def test_parses_elf32_kernel_with_4_byte_entry_note():
    image = parse_kernel(simple_kernel(paddr=0x100000, elf_class=32, relocatable=False))
    assert image.elf_class == 32
    assert image.entry == 0x100010
    assert image.reloc is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an ELF file"),
        (b"MZ\x90\x00" + b"\0" * 100, "not an ELF file"),
        (b"\x7fELF\x02\x01\x01", "malformed ELF"),
        (ElfSpec(segments=[LoadSegment(0x200000, b"\x90" * 16)]).build(), "no PVH entry point"),
        (
            ElfSpec(
                machine=40,
                segments=[LoadSegment(0x200000, b"\x90")],
                notes=[pvh_entry_note(0x200000)],
            ).build(),
            "is not x86",
        ),
        (ElfSpec(notes=[pvh_entry_note(0x200000)]).build(), "no loadable segments"),
        (
            ElfSpec(
                segments=[LoadSegment(0x200000, b"\x90" * 16)], notes=[pvh_entry_note(0x900000)]
            ).build(),
            "not inside a loadable segment",
        ),
        (
            ElfSpec(
                segments=[LoadSegment(0x200000, b"\x90" * 16)],
                notes=[Note(b"Xen", 18, b"\x00\x00\x20")],
            ).build(),
            "3-byte value",
        ),
        (
            ElfSpec(
                segments=[LoadSegment(0x200000, b"\x90" * 0x2000), LoadSegment(0x201000, b"\x90")],
                notes=[pvh_entry_note(0x200000)],
            ).build(),
            "overlap",
        ),
    ],
)
def test_rejects_bad_images_with_a_clear_message(data, message):
    with pytest.raises(BootError, match=message):
        parse_kernel(data)


def test_segment_past_end_of_file_is_rejected():
    data = bytearray(simple_kernel())
    # p_filesz of the first program header (ELF64: phdr at 64, p_filesz at +32)
    struct.pack_into("<Q", data, 64 + 32, 1 << 40)
    struct.pack_into("<Q", data, 64 + 40, 1 << 41)
    with pytest.raises(BootError, match="past the end of the file"):
        parse_kernel(bytes(data))


def test_random_corruption_never_escapes_as_another_exception():
    rng = random.Random(1234)
    valid = simple_kernel()
    for _ in range(400):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(0, 200)] = rng.randrange(256)
        if rng.random() < 0.2:
            data = data[: rng.randrange(4, len(data))]
        try:
            parse_kernel(bytes(data))
        except BootError:
            pass


def test_relocatable_kernel_keeps_its_offset_in_each_partition(memory):
    image = parse_kernel(simple_kernel())
    for partition in memory.partitions:
        placement = place(image, partition)
        assert placement.load_base == partition.base + 0x200000
        assert partition.contains(placement.boot_info, 0x2000)
        assert placement.boot_info + 0x2000 <= placement.load_base


def test_fixed_kernel_loads_at_its_own_address_or_is_refused(memory):
    image = parse_kernel(simple_kernel(paddr=0x100000, relocatable=False))
    assert place(image, memory.partitions[0]).delta == 0
    with pytest.raises(BootError, match="not relocatable"):
        place(image, memory.partitions[1])


def test_kernel_larger_than_partition_is_refused():
    image = parse_kernel(simple_kernel(size=0x1000, bss=40 * MiB))
    with pytest.raises(BootError, match=r"kernel needs .* but partition 0 .* has only"):
        place(image, Partition(0, 0, 32 * MiB))


def test_relocation_respects_the_note_minimum():
    spec = ElfSpec(
        segments=[LoadSegment(0x200000, b"\x90" * 0x100)],
        notes=[
            pvh_entry_note(0x200000),
            Note(b"Xen", 19, struct.pack("<III", 0x200000, 0x800000, 0xFFFFFFFF)),
        ],
    )
    placement = place(parse_kernel(spec.build()), Partition(0, 0, 32 * MiB))
    assert placement.load_base == 0x800000


def test_load_kernel_writes_image_start_info_and_memmap(memory):
    image = parse_kernel(simple_kernel())
    partition = memory.partitions[1]
    memory.fill(partition.base, partition.size, 0xAA)  # a reused partition is dirty
    result = load_kernel(memory.partition_writer(partition), image, "console=ttyS1 x=1")
    base = result.placement.load_base
    segment = image.segments[0]
    assert memory.read(base, len(segment.data)) == segment.data
    assert memory.read(base + len(segment.data), 0x1000) == b"\0" * 0x1000  # bss zeroed
    info = memory.read(result.placement.boot_info, 0x2000)
    magic, version, *_, cmdline_paddr, _rsdp, _memmap, entries, _ = START_INFO.unpack_from(info)
    assert (magic, version, entries) == (HVM_START_MAGIC, 1, 1)
    cmdline = memory.read(cmdline_paddr, 18)
    assert cmdline == b"console=ttyS1 x=1\0"
    (ram,) = parse_memmap(info)
    assert (ram.addr, ram.size, ram.type) == (partition.base, partition.size, 1)
    assert result.entry.rip == image.entry + partition.base
    assert result.entry.rbx == result.placement.boot_info


def test_loader_cannot_write_outside_its_partition(memory):
    writer = memory.partition_writer(memory.partitions[0])
    with pytest.raises(MemoryAccessError):
        writer.write(memory.partitions[1].base - 2, b"abcd")


def test_command_line_limits():
    image = parse_kernel(simple_kernel())
    with GuestMemory(8 * MiB) as mem, pytest.raises(BootError, match="at most 4095"):
        load_kernel(mem.partition_writer(mem.partitions[0]), image, "x" * 5000)
