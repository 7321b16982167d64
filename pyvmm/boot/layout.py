"""Where a kernel image and its boot information go inside a partition."""

from __future__ import annotations

from ..errors import BootError
from ..memory import Partition
from ..record import Record
from .elf import KernelImage

PAGE = 0x1000
# Boot information (start-info, memory map, command line) takes at most this much.
BOOT_INFO_SIZE = 0x2000
# Kept free at the bottom of a partition so that boot information finds room there.
BOOT_INFO_PREFERRED_OFFSET = 0x1000


class Placement(Record, frozen=True):
    delta: int  # added to every physical address in the image
    image_low: int
    image_high: int
    boot_info: int  # guest-physical address of the boot-information block

    @property
    def load_base(self) -> int:
        return self.image_low


def place(image: KernelImage, partition: Partition) -> Placement:
    """Choose the load address of ``image`` inside ``partition``.

    A relocatable image (it carries XEN_ELFNOTE_PHYS32_RELOC) keeps its offset
    from the partition base when it can, so a kernel linked at 2 MiB sits 2 MiB
    into whichever partition it boots in. A fixed image loads at its own physical
    addresses, which must then lie inside the partition.
    """
    if image.span > partition.size:
        raise BootError(
            f"kernel needs {_mib(image.span)} but {partition} has only {_mib(partition.size)}"
        )
    delta = _relocated_delta(image, partition) if image.reloc else _fixed_delta(image, partition)
    low, high = image.low + delta, image.high + delta
    return Placement(delta, low, high, _boot_info_address(low, high, partition))


def _fixed_delta(image: KernelImage, partition: Partition) -> int:
    if not partition.contains(image.low, image.span):
        raise BootError(
            f"kernel is not relocatable (no XEN_ELFNOTE_PHYS32_RELOC note) and its physical "
            f"addresses {image.low:#x}-{image.high:#x} fall outside {partition}"
        )
    return 0


def _relocated_delta(image: KernelImage, partition: Partition) -> int:
    reloc = image.reloc
    assert reloc is not None
    lowest = max(partition.base, reloc.min_addr)
    highest_end = min(partition.end, reloc.max_addr + 1)
    preferred = image.low + partition.base
    if _fits(preferred, image, lowest, highest_end, reloc.align):
        return preferred - image.low
    start = -(-lowest // reloc.align) * reloc.align
    if start + image.span <= highest_end:
        return start - image.low
    raise BootError(
        f"relocatable kernel ({_mib(image.span)}, alignment {reloc.align:#x}, allowed "
        f"{reloc.min_addr:#x}-{reloc.max_addr:#x}) does not fit in {partition}"
    )


def _fits(low: int, image: KernelImage, lowest: int, highest_end: int, align: int) -> bool:
    return low % align == 0 and low >= lowest and low + image.span <= highest_end


def _boot_info_address(low: int, high: int, partition: Partition) -> int:
    candidates = [partition.base + BOOT_INFO_PREFERRED_OFFSET, -(-high // PAGE) * PAGE]
    for address in candidates:
        end = address + BOOT_INFO_SIZE
        if partition.contains(address, BOOT_INFO_SIZE) and (end <= low or address >= high):
            return address
    raise BootError(f"no room for the boot information next to the kernel in {partition}")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
