"""CPU overhead: bench.elf's workloads under pyvmm, under QEMU microvm (same
kernel.elf) and natively on the host (bench-native, same workload source), in
alternating runs. Ratios are of median TSC cycles.

    python benchmarks/overhead.py [--runs 3] [--run alu,stream,chase,crc32,syscall,timer]
"""

from __future__ import annotations

import argparse
import statistics

from bench_runs import host_tsc_khz, native, under_pyvmm, under_qemu
from common import report

DEFAULT_RUN = "alu,stream,chase,crc32,syscall,timer"
COMPUTE = ("alu", "stream", "chase", "crc32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--run", default=DEFAULT_RUN)
    args = parser.parse_args()
    khz = host_tsc_khz()
    workloads = args.run.split(",")
    cycles = {p: {w: [] for w in workloads} for p in ("pyvmm", "qemu", "native")}
    checksums: dict[str, set[str]] = {w: set() for w in workloads}
    for _ in range(args.runs):
        for platform, runner in (("pyvmm", under_pyvmm), ("qemu", under_qemu), ("native", native)):
            lines = runner(f"run={args.run}", khz)
            for w in workloads:
                cycles[platform][w].append(lines[w]["cycles"])
                checksums[w].add(lines[w]["result"])
    table = {}
    for w in workloads:
        med = {p: statistics.median(cycles[p][w]) for p in cycles}
        table[w] = {
            "pyvmm_cycles": med["pyvmm"],
            "qemu_cycles": med["qemu"],
            "native_cycles": med["native"],
            "pyvmm_over_native": round(med["pyvmm"] / med["native"], 4),
            "pyvmm_over_qemu": round(med["pyvmm"] / med["qemu"], 4),
        }
    compute_vs_native = [table[w]["pyvmm_over_native"] for w in workloads if w in COMPUTE]
    result = {
        "benchmark": "overhead",
        "runs": args.runs,
        "tsc_khz": khz,
        "workloads": table,
        "results_identical": all(len(v) == 1 for v in checksums.values()),
    }
    worst_qemu = max(table[w]["pyvmm_over_qemu"] for w in workloads)
    report(
        result,
        "overhead: pyvmm/native "
        + ", ".join(f"{w} {table[w]['pyvmm_over_native']:.3f}" for w in workloads)
        + f"; CPL3 compute mean {statistics.mean(compute_vs_native):.3f}; "
        f"worst pyvmm/QEMU {worst_qemu:.3f}; results identical: {result['results_identical']}",
    )


if __name__ == "__main__":
    main()
