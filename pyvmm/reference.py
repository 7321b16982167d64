"""The reference VMM that pyvmm is compared with: QEMU's microvm machine, booting
the same kernel.elf through the same PVH entry (its isa-debug-exit device on port
0xf4 makes QEMU exit with ``(code << 1) | 1``)."""

from __future__ import annotations

import shutil


def qemu_microvm_command(kernel: str, cmdline: str, mem: str = "256M") -> list[str]:
    qemu = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    return [
        qemu,
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-m",
        mem,
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        kernel,
        "-append",
        cmdline,
    ]


def qemu_status(guest_code: int) -> int:
    """The process status QEMU exits with when the guest writes ``guest_code``."""
    return (guest_code << 1) | 1
