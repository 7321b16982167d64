"""Builds small ELF images in memory, for loader tests that need no compiler."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

PT_LOAD = 1
PT_NOTE = 4


@dataclass
class LoadSegment:
    paddr: int
    data: bytes
    memsz: int | None = None


@dataclass
class Note:
    name: bytes
    type: int
    desc: bytes


def pvh_entry_note(entry: int, width: int = 8) -> Note:
    return Note(b"Xen", 18, entry.to_bytes(width, "little"))


def pvh_reloc_note(
    align: int = 0x200000, minimum: int = 0x200000, maximum: int = 0xFFFFFFFF
) -> Note:
    return Note(b"Xen", 19, struct.pack("<III", align, minimum, maximum))


def _note_bytes(note: Note) -> bytes:
    name = note.name + b"\0"
    out = struct.pack("<III", len(name), len(note.desc), note.type)
    out += name + b"\0" * (-len(name) % 4)
    out += note.desc + b"\0" * (-len(note.desc) % 4)
    return out


@dataclass
class ElfSpec:
    elf_class: int = 64
    machine: int = 62  # EM_X86_64; 3 = EM_386
    elf_type: int = 2  # ET_EXEC
    segments: list[LoadSegment] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def build(self) -> bytes:
        is64 = self.elf_class == 64
        ehsize, phentsize = (64, 56) if is64 else (52, 32)
        phnum = len(self.segments) + (1 if self.notes else 0)
        offset = ehsize + phnum * phentsize
        blobs: list[bytes] = []
        phdrs: list[bytes] = []
        for seg in self.segments:
            memsz = len(seg.data) if seg.memsz is None else seg.memsz
            phdrs.append(_phdr(is64, PT_LOAD, offset, seg.paddr, len(seg.data), memsz, 0x1000))
            blobs.append(seg.data)
            offset += len(seg.data)
        if self.notes:
            note_data = b"".join(_note_bytes(n) for n in self.notes)
            phdrs.append(_phdr(is64, PT_NOTE, offset, 0, len(note_data), len(note_data), 4))
            blobs.append(note_data)
        ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + b"\0" * 9
        entry = self.segments[0].paddr if self.segments else 0
        if is64:
            header = ident + struct.pack(
                "<HHIQQQIHHHHHH",
                self.elf_type,
                self.machine,
                1,
                entry,
                ehsize,
                0,
                0,
                ehsize,
                phentsize,
                phnum,
                64,
                0,
                0,
            )
        else:
            header = ident + struct.pack(
                "<HHIIIIIHHHHHH",
                self.elf_type,
                self.machine,
                1,
                entry,
                ehsize,
                0,
                0,
                ehsize,
                phentsize,
                phnum,
                40,
                0,
                0,
            )
        return header + b"".join(phdrs) + b"".join(blobs)


def _phdr(
    is64: bool, kind: int, offset: int, paddr: int, filesz: int, memsz: int, align: int
) -> bytes:
    if is64:
        return struct.pack("<IIQQQQQQ", kind, 7, offset, paddr, paddr, filesz, memsz, align)
    return struct.pack("<IIIIIIII", kind, offset, paddr, paddr, filesz, memsz, 7, align)


def simple_kernel(
    paddr: int = 0x200000,
    size: int = 0x3000,
    relocatable: bool = True,
    elf_class: int = 64,
    bss: int = 0x1000,
) -> bytes:
    """A kernel image with one segment whose bytes are a recognisable pattern."""
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    notes = [pvh_entry_note(paddr + 0x10, 8 if elf_class == 64 else 4)]
    if relocatable:
        notes.append(pvh_reloc_note())
    return ElfSpec(
        elf_class=elf_class,
        machine=62 if elf_class == 64 else 3,
        segments=[LoadSegment(paddr, data, size + bss)],
        notes=notes,
    ).build()
