"""The same kernel.elf boots under QEMU microvm, the reference VMM, and says the same."""

from __future__ import annotations

import subprocess

import pytest
from harness import run_pyvmm

from pyvmm.reference import qemu_microvm_command, qemu_status

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]


def qemu_boot(kernel: str, cmdline: str) -> subprocess.CompletedProcess[bytes]:
    command = qemu_microvm_command(kernel, cmdline)
    return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def hello_lines(console: str) -> list[str]:
    return [line for line in console.splitlines() if line.startswith("hello: ")]


def test_hello_says_the_same_under_qemu_and_pyvmm(kernels):
    kernel = str(kernels / "hello.elf")
    cmdline = "console=ttyS0 from=test tsc_khz=1000000"  # given, so pyvmm adds nothing
    qemu = qemu_boot(kernel, cmdline)
    # isa-debug-exit: QEMU exits with (code << 1) | 1, so the guest's exit(0) is 1.
    assert qemu.returncode == qemu_status(0), qemu.stderr.decode()
    status, out, err = run_pyvmm(["boot", kernel, "--cmdline", cmdline, "--timeout", "20"])
    assert status == 0, err
    under_qemu, under_pyvmm = hello_lines(qemu.stdout.decode()), hello_lines(out)
    assert under_qemu[0] == under_pyvmm[0] == "hello: Hello from hello.elf, a PVH guest kernel"
    for prefix in ('hello: cmdline="', "hello: load_base=", "hello: exit="):
        assert [x for x in under_qemu if x.startswith(prefix)] == [
            x for x in under_pyvmm if x.startswith(prefix)
        ]
    # QEMU describes its whole machine (BIOS area, RAM); pyvmm only the partition.
    assert any(" type=1" in line for line in under_qemu if "e820" in line)


def test_hello32_boots_under_qemu(kernels):
    qemu = qemu_boot(str(kernels / "hello32.elf"), "console=ttyS0")
    assert qemu.returncode == qemu_status(0), qemu.stderr.decode()
    assert "hello32: Hello from hello32.elf, a 32-bit PVH guest kernel" in qemu.stdout.decode()


def test_kernel_relocates_itself_when_qemu_loads_it_elsewhere(kernels, tmp_path):
    """QEMU loads at p_paddr; moving p_paddr makes the kernel run away from its link address."""
    import subprocess as sp
    import sys

    shifted = tmp_path / "hello-shifted.elf"
    tool = kernels.parent / "tools" / "shift_load.py"
    sp.run(
        [sys.executable, str(tool), str(kernels / "hello.elf"), str(shifted), "0x1000000"],
        check=True,
    )
    qemu = qemu_boot(str(shifted), "console=ttyS0")
    assert qemu.returncode == qemu_status(0), qemu.stderr.decode()
    assert "hello: load_base=0x0000000001200000" in qemu.stdout.decode()
