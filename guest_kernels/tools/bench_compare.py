#!/usr/bin/env python3
"""Run bench.elf under pyvmm (and QEMU microvm) and build/bench-native, compare.

    guest_kernels/tools/bench_compare.py [--qemu] [--runs N] [bench args ...]

e.g. `tools/bench_compare.py --qemu run=alu,crc32`.  For every workload it prints
the median cycles of each platform, the guest/native ratio, and whether the
result checksums agree.  Run from the repository root (uses .venv/bin/pyvmm);
tsc_khz comes from KVM_GET_TSC_KHZ.  Exits 1 if any checksum differs.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "guest_kernels" / "build"


def kvm_tsc_khz() -> int:
    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
        try:
            vcpu = fcntl.ioctl(vm, 0xAE41, 0)  # KVM_CREATE_VCPU
            try:
                return fcntl.ioctl(vcpu, 0xAEA3, 0)  # KVM_GET_TSC_KHZ
            finally:
                os.close(vcpu)
        finally:
            os.close(vm)
    finally:
        os.close(kvm)


def parse(out: str) -> dict[str, dict]:
    lines = {}
    for line in out.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            lines[rec["bench"]] = rec
    if "done" not in lines:
        raise SystemExit(f"no 'done' line in:\n{out}")
    return lines


def run_native(args: list[str]) -> dict[str, dict]:
    out = subprocess.run(
        [str(BUILD / "bench-native"), *args], check=True, capture_output=True, text=True
    )
    return parse(out.stdout)


def run_pyvmm(args: list[str]) -> dict[str, dict]:
    cmd = [
        str(ROOT / ".venv" / "bin" / "pyvmm"),
        "boot",
        str(BUILD / "bench.elf"),
        "--cmdline",
        " ".join(["console=ttyS0", *args]),
        "--mem",
        "256M",
        "--timeout",
        "300",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=330)
    return parse(out.stdout)


def run_qemu(args: list[str]) -> dict[str, dict]:
    cmd = [
        "qemu-system-x86_64",
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-m",
        "256M",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        str(BUILD / "bench.elf"),
        "-append",
        " ".join(["console=ttyS0", *args]),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=330)
    return parse(out.stdout)


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    argv = sys.argv[1:]
    qemu = "--qemu" in argv
    runs = 1
    if "--runs" in argv:
        i = argv.index("--runs")
        runs = int(argv[i + 1])
        del argv[i : i + 2]
    args = [a for a in argv if a != "--qemu"]
    if not any(a.startswith("tsc_khz=") for a in args):
        args.append(f"tsc_khz={kvm_tsc_khz()}")
    platforms = {"native": run_native, "pyvmm": run_pyvmm}
    if qemu:
        platforms["qemu"] = run_qemu
    results: dict[str, list[dict[str, dict]]] = {p: [] for p in platforms}
    for _ in range(runs):
        for name, fn in platforms.items():
            results[name].append(fn(args))
    names = [b for b in results["pyvmm"][0] if b not in ("start", "done")]
    ok = True
    header = f"{'bench':8} " + " ".join(f"{p + ' cycles':>16}" for p in platforms)
    header += (
        " " + " ".join(f"{p + '/native':>14}" for p in platforms if p != "native") + "  results"
    )
    print(header)
    for b in names:
        med = {}
        for p in platforms:
            vals = [r[b]["cycles"] for r in results[p] if b in r and "cycles" in r[b]]
            med[p] = statistics.median(vals) if vals else None
        res = {
            r[b].get("result") for p in platforms for r in results[p] if b in r and "result" in r[b]
        }
        same = len(res) == 1
        ok &= same
        cells = " ".join(f"{fmt(med[p], '.0f'):>16}" for p in platforms)
        ratios = " ".join(
            f"{fmt(med[p] / med['native'] if med[p] and med['native'] else None, '.3f'):>14}"
            for p in platforms
            if p != "native"
        )
        print(f"{b:8} {cells} {ratios}  {'same' if same else 'DIFFER ' + str(sorted(res))}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
