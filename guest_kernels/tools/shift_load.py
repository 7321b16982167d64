#!/usr/bin/env python3
"""Copy a 64-bit PVH kernel with its load address moved by DELTA (a multiple of 2 MiB).

Only the physical side changes: p_paddr of every segment, e_entry and the
XEN_ELFNOTE_PHYS32_ENTRY address.  The code stays linked for the old address,
so a loader that honours p_paddr (QEMU) makes the kernel relocate itself, as a
loader using XEN_ELFNOTE_PHYS32_RELOC would:

    tools/shift_load.py build/hello.elf build/hello-shifted.elf 0x200000
"""

import struct
import sys


def shift(data: bytearray, delta: int) -> None:
    assert data[:5] == b"\x7fELF\x02", "ELF64 only"
    assert delta % 0x200000 == 0, "delta must be a multiple of 2 MiB"
    (entry,) = struct.unpack_from("<Q", data, 24)
    struct.pack_into("<Q", data, 24, entry + delta)
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        ph = phoff + i * phentsize
        (p_type,) = struct.unpack_from("<I", data, ph)
        p_offset, _vaddr, p_paddr, p_filesz = struct.unpack_from("<QQQQ", data, ph + 8)
        struct.pack_into("<Q", data, ph + 24, p_paddr + delta)
        if p_type != 4:  # PT_NOTE
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, off)
            desc = off + 12 + (namesz + 3) // 4 * 4
            if data[off + 12 : off + 15] == b"Xen" and ntype == 18:
                fmt = "<Q" if descsz == 8 else "<I"
                (addr,) = struct.unpack_from(fmt, data, desc)
                struct.pack_into(fmt, data, desc, addr + delta)
            off = desc + (descsz + 3) // 4 * 4


if __name__ == "__main__":
    src, dst, delta = sys.argv[1], sys.argv[2], int(sys.argv[3], 0)
    with open(src, "rb") as f:
        data = bytearray(f.read())
    shift(data, delta)
    with open(dst, "wb") as f:
        f.write(data)
