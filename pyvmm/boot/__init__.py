"""Boot: load a PVH kernel image into a partition and describe the entry state.

Pure functions over a ``PartitionMemory``; nothing here touches KVM, so it can be
unit-tested and fuzzed without /dev/kvm.
"""

from __future__ import annotations

from ..memory import PartitionMemory
from ..record import Record
from .cpu import EntryState, pvh_entry_state
from .elf import KernelImage, parse_kernel
from .layout import Placement, place
from .start_info import MemoryRange, build_boot_info

__all__ = ["BootResult", "EntryState", "KernelImage", "load_kernel", "parse_kernel"]


class BootResult(Record, frozen=True):
    placement: Placement
    entry: EntryState
    memmap: tuple[MemoryRange, ...]


def load_kernel(memory: PartitionMemory, image: KernelImage, cmdline: str) -> BootResult:
    """Copy ``image`` into its partition, write the start-info, return the entry state."""
    partition = memory.partition
    placement = place(image, partition)
    memmap = [MemoryRange(partition.base, partition.size)]
    boot_info = build_boot_info(placement.boot_info, cmdline, memmap)
    for segment in image.segments:
        address = segment.paddr + placement.delta
        memory.write(address, segment.data)
        memory.fill(address + len(segment.data), segment.memsz - len(segment.data))
    memory.write(placement.boot_info, boot_info)
    entry = pvh_entry_state(image.entry + placement.delta, placement.boot_info)
    return BootResult(placement, entry, tuple(memmap))
