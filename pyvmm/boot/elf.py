"""Kernel ELF parsing: loadable segments and the PVH notes.

Pure: bytes in, a ``KernelImage`` out. Everything in the file is untrusted, so
every failure, including pyelftools' own, becomes a ``BootError`` with a message.
"""

from __future__ import annotations

import io
import struct

from ..errors import BootError
from ..record import Record

EM_386 = 3
EM_X86_64 = 62
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_ELFNOTE_PHYS32_RELOC = 19

# Defaults of the Xen PHYS32_RELOC note for fields a kernel leaves out.
RELOC_DEFAULT_ALIGN = 0x200000
RELOC_DEFAULT_MIN = 0
RELOC_DEFAULT_MAX = 0xFFFF_FFFF


class Segment(Record, frozen=True):
    paddr: int
    data: bytes  # p_filesz bytes from the file
    memsz: int  # bytes in memory; the tail past len(data) is zero-filled
    file_offset: int = 0  # where data starts in the image file

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


class RelocConstraint(Record, frozen=True):
    """XEN_ELFNOTE_PHYS32_RELOC: the kernel relocates itself within these limits."""

    align: int
    min_addr: int
    max_addr: int  # the last byte of the image may not lie above this


class KernelImage(Record, frozen=True):
    elf_class: int  # 32 or 64
    segments: tuple[Segment, ...]
    entry: int  # physical 32-bit PVH entry point
    reloc: RelocConstraint | None

    @property
    def low(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def high(self) -> int:
        return max(s.end for s in self.segments)

    @property
    def span(self) -> int:
        return self.high - self.low


def parse_kernel(data: bytes, name: str = "kernel") -> KernelImage:
    """Parse a PVH kernel image. Raises BootError naming what is wrong."""
    if data[:4] != b"\x7fELF":
        raise BootError(f"{name}: not an ELF file (bad magic)")
    # Imported here: pyelftools is the largest import on the boot path.
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
        return _parse(elf, data, name)
    except BootError:
        raise
    except (
        ELFError,
        struct.error,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        AssertionError,
        OverflowError,
        UnicodeDecodeError,
        EOFError,
    ) as exc:
        raise BootError(f"{name}: malformed ELF: {exc or type(exc).__name__}") from None
    except Exception as exc:  # pyelftools' construct layer raises its own types
        raise BootError(f"{name}: malformed ELF: {type(exc).__name__}: {exc}") from None


def _parse(elf, data: bytes, name: str) -> KernelImage:
    machine = elf.header["e_machine"]
    if machine not in ("EM_X86_64", "EM_386"):
        raise BootError(f"{name}: ELF machine {machine} is not x86 (EM_386 or EM_X86_64)")
    if elf.header["e_type"] not in ("ET_EXEC", "ET_DYN"):
        raise BootError(f"{name}: ELF type {elf.header['e_type']} is not an executable")
    segments: list[Segment] = []
    entry: int | None = None
    reloc: RelocConstraint | None = None
    for index in range(elf.num_segments()):
        header = elf._get_segment_header(index)
        kind = header["p_type"]
        if kind == "PT_LOAD":
            segments.append(_load_segment(header, data, name, index))
        elif kind == "PT_NOTE":
            seg_entry, seg_reloc = _xen_notes(elf.get_segment(index), name)
            entry = seg_entry if seg_entry is not None else entry
            reloc = seg_reloc if seg_reloc is not None else reloc
    if entry is None:
        raise BootError(
            f"{name}: no PVH entry point (Xen ELF note type {XEN_ELFNOTE_PHYS32_ENTRY}, "
            "XEN_ELFNOTE_PHYS32_ENTRY); pyvmm boots kernels through the PVH ABI"
        )
    segments = [s for s in segments if s.memsz]
    if not segments:
        raise BootError(f"{name}: no loadable segments")
    _check_overlap(segments, name)
    image = KernelImage(elf.elfclass, tuple(sorted(segments, key=lambda s: s.paddr)), entry, reloc)
    if not any(s.paddr <= entry < s.end for s in image.segments):
        raise BootError(f"{name}: PVH entry point {entry:#x} is not inside a loadable segment")
    return image


def _load_segment(header, data: bytes, name: str, index: int) -> Segment:
    offset, filesz, memsz = header["p_offset"], header["p_filesz"], header["p_memsz"]
    paddr = header["p_paddr"]
    if filesz > memsz:
        raise BootError(f"{name}: segment {index} has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
    if offset + filesz > len(data):
        raise BootError(f"{name}: segment {index} extends past the end of the file")
    if paddr + memsz > 1 << 52:
        raise BootError(f"{name}: segment {index} physical address {paddr:#x} is out of range")
    return Segment(paddr, data[offset : offset + filesz], memsz, offset)


def _check_overlap(segments: list[Segment], name: str) -> None:
    ordered = sorted(segments, key=lambda s: s.paddr)
    for before, after in zip(ordered, ordered[1:], strict=False):  # noqa: RUF007
        if after.paddr < before.end:
            raise BootError(
                f"{name}: loadable segments overlap at {after.paddr:#x}-{before.end:#x}"
            )


def _xen_notes(segment, name: str) -> tuple[int | None, RelocConstraint | None]:
    entry = reloc = None
    for note in segment.iter_notes():
        if note["n_name"] != "Xen":
            continue
        kind = note["n_type"]
        desc = bytes(note["n_descdata"])
        if kind == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(desc) not in (4, 8):
                raise BootError(f"{name}: PVH entry note has a {len(desc)}-byte value, not 4 or 8")
            entry = int.from_bytes(desc, "little")
            if entry >= 1 << 32:
                raise BootError(f"{name}: PVH entry point {entry:#x} is above 4 GiB")
        elif kind == XEN_ELFNOTE_PHYS32_RELOC:
            reloc = _reloc_note(desc, name)
    return entry, reloc


def _reloc_note(desc: bytes, name: str) -> RelocConstraint:
    if len(desc) % 4 or len(desc) > 12:
        raise BootError(f"{name}: PHYS32_RELOC note has a malformed {len(desc)}-byte value")
    values = [int.from_bytes(desc[i : i + 4], "little") for i in range(0, len(desc), 4)]
    defaults = [RELOC_DEFAULT_ALIGN, RELOC_DEFAULT_MIN, RELOC_DEFAULT_MAX]
    align, min_addr, max_addr = values + defaults[len(values) :]
    if align == 0 or align & (align - 1) or align < 0x1000:
        raise BootError(f"{name}: PHYS32_RELOC alignment {align:#x} is not a power of two >= 4 KiB")
    if min_addr > max_addr:
        raise BootError(f"{name}: PHYS32_RELOC minimum {min_addr:#x} exceeds maximum {max_addr:#x}")
    return RelocConstraint(align, min_addr, max_addr)
