"""Exit cost: bench.elf's `portio` workload (N `outb` to port 0x80, which no device
claims, from CPL3: each one a VM exit to the VMM and back) under pyvmm and under
QEMU microvm, alternating runs.

    python benchmarks/exit_cost.py [--runs 5] [--n 20000]
"""

from __future__ import annotations

import argparse
import statistics

from bench_runs import host_tsc_khz, under_pyvmm, under_qemu
from common import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    khz = host_tsc_khz()
    workload = f"run=portio n_portio={args.n}"
    per_exit_us: dict[str, list[float]] = {"pyvmm": [], "qemu": []}
    for _ in range(args.runs):
        for name, runner in (("pyvmm", under_pyvmm), ("qemu", under_qemu)):
            line = runner(workload, khz)["portio"]
            per_exit_us[name].append(line["cycles"] / line["work"] / khz * 1000)
    result: dict[str, object] = {
        "benchmark": "exit_cost",
        "exits_per_run": args.n,
        "runs": args.runs,
        "tsc_khz": khz,
    }
    for name, samples in per_exit_us.items():
        median = statistics.median(samples)
        result[name] = {
            "round_trip_us_median": round(median, 2),
            "round_trip_us_all": [round(x, 2) for x in samples],
            "exits_per_second": round(1e6 / median),
        }
    ratio = result["pyvmm"]["exits_per_second"] / result["qemu"]["exits_per_second"]
    result["exits_per_second_ratio_pyvmm_over_qemu"] = round(ratio, 3)
    report(
        result,
        f"exit_cost: pyvmm {result['pyvmm']['exits_per_second']} exits/s "
        f"({result['pyvmm']['round_trip_us_median']} us round trip), QEMU "
        f"{result['qemu']['exits_per_second']} exits/s "
        f"({result['qemu']['round_trip_us_median']} us); pyvmm/QEMU {ratio:.2f}",
    )


if __name__ == "__main__":
    main()
