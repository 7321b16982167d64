"""The PVH ``hvm_start_info`` block, its e820-style memory map and the command line."""

from __future__ import annotations

import struct

from ..errors import BootError
from ..record import Record

HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_VERSION = 1  # version 1 carries the memory map

E820_RAM = 1
E820_RESERVED = 2

# u32 magic, version, flags, nr_modules; u64 modlist, cmdline, rsdp, memmap; u32 entries, pad
START_INFO = struct.Struct("<IIIIQQQQII")
MEMMAP_ENTRY = struct.Struct("<QQII")
MAX_CMDLINE = 4095
MEMMAP_OFFSET = 0x40  # the memory map follows the start-info in the same block
MAX_MEMMAP_ENTRIES = (0x1000 - MEMMAP_OFFSET) // MEMMAP_ENTRY.size
CMDLINE_OFFSET = 0x1000


class MemoryRange(Record, frozen=True):
    addr: int
    size: int
    type: int = E820_RAM


def build_boot_info(address: int, cmdline: str, memmap: list[MemoryRange]) -> bytes:
    """The bytes of the boot-information block that is placed at ``address``.

    Layout: start-info at +0, memory map at +0x40, command line at +0x1000.
    """
    encoded = cmdline.encode()
    if b"\0" in encoded:
        raise BootError("the kernel command line may not contain NUL bytes")
    if len(encoded) > MAX_CMDLINE:
        raise BootError(f"the kernel command line is {len(encoded)} bytes; at most {MAX_CMDLINE}")
    if len(memmap) > MAX_MEMMAP_ENTRIES:
        raise BootError(f"memory map has {len(memmap)} entries; at most {MAX_MEMMAP_ENTRIES}")
    block = bytearray(CMDLINE_OFFSET + len(encoded) + 1)
    START_INFO.pack_into(
        block,
        0,
        HVM_START_MAGIC,
        HVM_START_INFO_VERSION,
        0,  # flags
        0,  # no modules
        0,
        address + CMDLINE_OFFSET,
        0,  # no ACPI RSDP
        address + MEMMAP_OFFSET,
        len(memmap),
        0,
    )
    for i, entry in enumerate(memmap):
        MEMMAP_ENTRY.pack_into(
            block, MEMMAP_OFFSET + i * MEMMAP_ENTRY.size, entry.addr, entry.size, entry.type, 0
        )
    block[CMDLINE_OFFSET : CMDLINE_OFFSET + len(encoded)] = encoded
    return bytes(block)


def parse_memmap(block: bytes) -> list[MemoryRange]:
    """Read the memory map back out of a boot-information block (for tests and tools)."""
    magic, _, _, _, _, _, _, _memmap_paddr, entries, _ = START_INFO.unpack_from(block)
    if magic != HVM_START_MAGIC:
        raise ValueError(f"bad start-info magic {magic:#x}")
    ranges = []
    for i in range(entries):
        addr, size, kind, _ = MEMMAP_ENTRY.unpack_from(block, MEMMAP_OFFSET + i * MEMMAP_ENTRY.size)
        ranges.append(MemoryRange(addr, size, kind))
    return ranges
