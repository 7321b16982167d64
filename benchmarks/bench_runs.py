"""Running bench.elf under pyvmm and QEMU microvm, and bench-native on the host; each
run also reports the peak huge-page backing of the process (guest RAM or the native
program's buffers), sampled from /proc/PID/smaps_rollup while it runs, and, where it
is known, the share of each workload's wall time its thread was on a CPU (native:
its own CLOCK_THREAD_CPUTIME_ID; pyvmm in this process: in_process.py)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field

from common import KERNELS, pyvmm_command, qemu_microvm_command
from harness import PeakBacking

# stream's buffer: the memory a memory-bound workload needs on huge pages
STREAM_MIB = 64


@dataclass
class BenchRun:
    lines: dict[str, dict]  # bench.elf's JSON lines by workload
    huge_mib: float  # peak AnonHugePages + ShmemPmdMapped of the process
    on_cpu: dict[str, float] = field(default_factory=dict)  # CPU time / wall time

    def cycles(self, workloads: list[str]) -> dict[str, float]:
        """TSC cycles of each workload (wall time), and as ``<name>_cpu`` the cycles
        its thread was on a CPU, where known: what other processes' use of the CPU
        does not change."""
        out = {w: float(self.lines[w]["cycles"]) for w in workloads}
        for w in workloads:
            if w in self.on_cpu:
                out[f"{w}_cpu"] = out[w] * self.on_cpu[w]
        return out


def native_on_cpu(lines: dict[str, dict]) -> dict[str, float]:
    """bench-native's own CPU time per workload ("cpu_ns") over its TSC wall time."""
    khz = lines["start"]["tsc_khz"]
    return {
        name: line["cpu_ns"] * khz / 1e6 / line["cycles"]
        for name, line in lines.items()
        if "cpu_ns" in line and line.get("cycles")
    }


def parse(console: str) -> dict[str, dict]:
    lines = [json.loads(x) for x in console.splitlines() if x.startswith('{"bench"')]
    return {line["bench"]: line for line in lines}


def _checked(command: list[str], ok_status: int, what: str) -> BenchRun:
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with PeakBacking(process.pid) as backing:
        try:
            stdout, stderr = process.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            raise SystemExit(f"{what} timed out:\n{stdout}{stderr}") from None
    lines = parse(stdout)
    if process.returncode != ok_status or "done" not in lines:
        raise SystemExit(f"{what} failed ({process.returncode}):\n{stdout}{stderr}")
    return BenchRun(lines, backing.huge_mib(), native_on_cpu(lines))


def under_pyvmm(args: str, tsc_khz: int) -> BenchRun:
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


def under_qemu(args: str, tsc_khz: int) -> BenchRun:
    # QEMU's isa-debug-exit reports the guest's exit(0) as status 1.
    cmdline = f"console=ttyS0 tsc_khz={tsc_khz} {args}"
    return _checked(qemu_microvm_command(KERNELS / "bench.elf", cmdline), 1, "bench.elf in QEMU")


def native(args: str, tsc_khz: int, hugepages: bool = False) -> BenchRun:
    command = [str(KERNELS / "bench-native"), f"tsc_khz={tsc_khz}", *args.split()]
    if hugepages:
        command.append("hugepages=1")
    return _checked(command, 0, "bench-native")


def host_tsc_khz() -> int:
    """The TSC frequency KVM reports (what pyvmm passes its guests)."""
    from pyvmm.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm() as vm, vm.create_vcpu(0) as vcpu:
        return vcpu.tsc_khz()
