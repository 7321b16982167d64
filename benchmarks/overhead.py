"""CPU overhead: bench.elf's workloads under pyvmm (a Machine in this process, as
`pyvmm boot` runs it), under QEMU microvm (same kernel.elf) and natively on the host
(bench-native, same workload source), in alternating rounds through
benchmarks/harness.py. Ratios are of TSC cycles, the median of per-round ratios with
a bootstrap 95% CI: ``<workload>`` of wall cycles, ``<workload>_cpu`` of the cycles
the thread was on a CPU (pyvmm: the vCPU thread's CPU time, read at bench.elf's
mark lines; native: its own CLOCK_THREAD_CPUTIME_ID; QEMU: not known). The
``_cpu`` ratios are the ones the precision target applies to: on this shared machine
wall time mostly measures the other processes.

    python benchmarks/overhead.py [--run alu,stream,chase,crc32,syscall,timer]
        [--platforms pyvmm,qemu,native] [--native-hugepages match|on|off]
        [--aa pyvmm] [--rounds 10] [--precision 0.5] [--time-cap 480] [--pin]

``--aa pyvmm`` compares pyvmm against itself (the noise check). Memory backing:
pyvmm's guest RAM is madvise(MADV_HUGEPAGE)d, bench-native uses 4 KiB pages unless
given hugepages=1; ``match`` (default) gives native the backing a probe run of
pyvmm got, and every run's peak huge-page MiB is reported per platform.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import harness
from bench_runs import STREAM_MIB, BenchRun, host_tsc_khz, native, under_qemu
from common import report
from in_process import bench_run

DEFAULT_RUN = "alu,stream,chase,crc32,syscall,timer"
COMPUTE = ("alu", "stream", "chase", "crc32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", default=DEFAULT_RUN)
    parser.add_argument("--platforms", default="pyvmm,qemu,native")
    parser.add_argument("--native-hugepages", choices=("match", "on", "off"), default="match")
    parser.add_argument("--aa", default=None, help="A/A: this platform against itself")
    parser.add_argument("--args", default="", help="extra bench.elf arguments (e.g. n_alu=1000000)")
    harness.add_arguments(parser, harness.Plan(min_rounds=10, max_rounds=20, time_cap_s=480))
    args = parser.parse_args()
    conditions = harness.Conditions.pinned(args)
    khz = host_tsc_khz()
    workloads = args.run.split(",")
    bench_args = f"run={args.run} mark=1 {args.args}".strip()

    if args.native_hugepages == "match":
        probe = bench_run("plain", "console=ttyS0 run=stream n_stream=1")
        native_huge = probe.huge_mib >= STREAM_MIB
    else:
        native_huge = args.native_hugepages == "on"
    runners: dict[str, Callable[[], BenchRun]] = {
        "pyvmm": lambda: bench_run("plain", f"console=ttyS0 tsc_khz={khz} {bench_args}"),
        "qemu": lambda: under_qemu(bench_args, khz),
        "native": lambda: native(bench_args, khz, native_huge),
    }
    platforms = args.platforms.split(",")
    checksums: dict[str, set[str]] = {w: set() for w in workloads}
    huge_mib: dict[str, list[float]] = {}

    def measured(name: str, run: Callable[[], BenchRun]) -> harness.Runner:
        def once() -> dict[str, float]:
            done = run()
            for w in workloads:
                checksums[w].add(done.lines[w]["result"])
            huge_mib.setdefault(name, []).append(done.huge_mib)
            return done.cycles(workloads)

        return once

    configs = {p: measured(p, runners[p]) for p in platforms}
    rounds, baseline = harness.compare(
        args,
        configs,
        "native" if "native" in configs else platforms[0],
        "overhead",
        [f"{w}_cpu" for w in workloads],
        aa_runner=lambda side: measured(side, runners[args.aa]),
    )
    out = rounds.to_json()
    seconds = {
        name: {w: round(per[w]["median"] / khz / 1000, 3) for w in workloads}
        for name, per in out["configs"].items()
    }
    extra = {}
    if {"pyvmm", "qemu"} <= set(rounds.samples):
        pq = rounds.samples
        extra["pyvmm_over_qemu"] = {
            w: harness.paired_ratio(pq["pyvmm"][w], pq["qemu"][w])
            for w in workloads  # wall
        }
    result = {
        "benchmark": "overhead",
        "mode": f"A/A {args.aa}" if args.aa else "platforms",
        "tsc_khz": khz,
        "bench_args": bench_args,
        **out,
        **extra,
        "workload_seconds_median": seconds,
        "results_identical": all(len(v) == 1 for v in checksums.values()),
        "backing": {
            "native_hugepages": native_huge,
            "stream_mib": STREAM_MIB,
            **{n: harness.backing_summary(v, STREAM_MIB) for n, v in huge_mib.items()},
        },
        **conditions.to_json(),
    }
    parts = []
    for name, per in out["ratios"].items():
        shown = [f"{w}_cpu" if f"{w}_cpu" in per else w for w in workloads]
        parts.append(
            f"{name}/{baseline} " + ", ".join(f"{m} {harness.ci_text(per[m])}" for m in shown)
        )
        compute = [per[m]["ratio"] for m in shown if m.removesuffix("_cpu") in COMPUTE]
        if compute:
            parts[-1] += f" (CPL3 compute mean {statistics.mean(compute):.4f})"
    widest = rounds.widest() * 100
    report(
        result,
        f"overhead: {out['method']['rounds']} rounds ({out['method']['stop_reason']}), "
        + "; ".join(parts)
        + f"; widest _cpu CI ±{widest:.2f}%; results identical: {result['results_identical']}; "
        f"native huge pages {native_huge}",
    )


if __name__ == "__main__":
    main()
