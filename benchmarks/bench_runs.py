"""Running bench.elf under pyvmm and QEMU microvm, and bench-native on the host."""

from __future__ import annotations

import json
import subprocess

from common import KERNELS, pyvmm_command, qemu_microvm_command


def parse(console: str) -> dict[str, dict]:
    lines = [json.loads(x) for x in console.splitlines() if x.startswith('{"bench"')]
    return {line["bench"]: line for line in lines}


def _checked(command: list[str], ok_status: int, what: str) -> dict[str, dict]:
    done = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900
    )
    lines = parse(done.stdout)
    if done.returncode != ok_status or "done" not in lines:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return lines


def under_pyvmm(args: str, tsc_khz: int) -> dict[str, dict]:
    cmdline = f"console=ttyS0 tsc_khz={tsc_khz} {args}"
    command = [
        *pyvmm_command(),
        "boot",
        str(KERNELS / "bench.elf"),
        "--cmdline",
        cmdline,
        "--timeout",
        "600",
    ]
    return _checked(command, 0, "bench.elf under pyvmm")


def under_qemu(args: str, tsc_khz: int) -> dict[str, dict]:
    # QEMU's isa-debug-exit reports the guest's exit(0) as status 1.
    cmdline = f"console=ttyS0 tsc_khz={tsc_khz} {args}"
    return _checked(qemu_microvm_command(KERNELS / "bench.elf", cmdline), 1, "bench.elf in QEMU")


def native(args: str, tsc_khz: int) -> dict[str, dict]:
    command = [str(KERNELS / "bench-native"), f"tsc_khz={tsc_khz}", *args.split()]
    return _checked(command, 0, "bench-native")


def host_tsc_khz() -> int:
    """The TSC frequency KVM reports (what pyvmm passes its guests)."""
    from pyvmm.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        return vcpu.tsc_khz()
