"""Microvisor costs: world-switch latency, kick latency, and the CPU overhead of
bench.elf's CPL3 workloads in four modes, alternated in rounds by
benchmarks/harness.py; overheads are paired ratios to plain with bootstrap 95% CIs.

    python benchmarks/microvisor.py [--modes plain,devirtualized,virtualized,virtualized+idle]
        [--rounds 10] [--precision 0.5] [--aa plain] [--switch-seconds 2] [--pin]

Modes: plain (no microvisor), devirtualized (the microvisor virtualizes, boots and
stops a second instance, and devirtualizes while bench.elf waits (wait_ms), before
the first workload starts; checked every run), virtualized (one instance, trapped),
virtualized+idle (a second instance that sleeps waiting for an interrupt). Every mode
runs the same command line, including the wait. virtualized+busy[@<ms>ms][/<isolation>]
(not in the default list): a second instance computing at CPL3 beside bench.elf, with
that slice and isolation mode; bench.elf then has about half the vCPU, so its overhead
is reported as on-CPU ratio / 2 - 1 ("busy_overhead_percent"; it also counts any
unfairness between the two turns).

Memory isolation (benchmarks/isolation_costs.py, --isolation-rounds, 0 to skip): the
world switch and the memory-slot change by isolation mode, the first slot update, and
the extra time a guest needs after a switch-in to fault its pages in again.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import harness
import isolation_costs
from common import KERNELS, report
from in_process import BUSY, MODES, bench_run

from pyvmm.machine import Machine, RunResult
from pyvmm.microvisor import Microvisor

MiB = 1 << 20
WORKLOADS = ("alu", "stream", "chase", "crc32")
STREAM_MIB = 64


def world_switch(seconds: float) -> dict:
    """Two spinning instances alternating on 1 ms slices."""
    with Machine(256 * MiB, partitions=2, console=lambda b: None, console2=lambda b: None) as m:
        mv = Microvisor(m, slice_s=0.001)
        mv.boot(str(KERNELS / "probe.elf"), "console=ttyS0 probe=spin")

        def drive() -> None:
            mv.virtualize()
            mv.start(str(KERNELS / "probe.elf"), "console=ttyS1 probe=spin", name="b")
            time.sleep(seconds)
            mv.stop("b")  # ending the run retires only the instance on the vCPU
            m.call_on_vcpu(lambda: m.stop(RunResult("stopped", 0)))

        thread = threading.Thread(target=drive)
        thread.start()
        mv.run(seconds + 30)
        thread.join()
        samples = [x * 1e6 for x in mv.switch_latency]
    return {"switches": len(samples), "latency_us": harness.median_ci(samples, 1)}


def kick_latency(count: int) -> dict:
    """From kick() on another thread to the vCPU thread running the posted call."""
    with Machine(64 * MiB, console=lambda b: None) as m:
        m.boot(str(KERNELS / "probe.elf"), "console=ttyS0 probe=spin")
        samples: list[float] = []

        def drive() -> None:
            time.sleep(0.2)
            for _ in range(count):
                arrived = threading.Event()
                started = time.perf_counter()

                def mark(started: float = started, arrived: threading.Event = arrived) -> None:
                    samples.append((time.perf_counter() - started) * 1e6)
                    arrived.set()

                m.call_on_vcpu(mark)
                arrived.wait(5)
                time.sleep(0.002)
            m.call_on_vcpu(lambda: m.stop(RunResult("stopped", 0)))

        thread = threading.Thread(target=drive)
        thread.start()
        m.run(60)
        thread.join()
    return {"kicks": len(samples), "latency_us": harness.median_ci(samples, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--aa", default=None, help="A/A: this mode against itself")
    parser.add_argument("--wait-ms", type=int, default=1000, help="bench.elf's wait_ms")
    parser.add_argument("--args", default="", help="extra bench.elf arguments")
    parser.add_argument("--switch-seconds", type=float, default=2.0)
    parser.add_argument("--kicks", type=int, default=300)
    parser.add_argument("--isolation-rounds", type=int, default=3)
    harness.add_arguments(parser, harness.Plan(min_rounds=10, max_rounds=20, time_cap_s=480))
    args = parser.parse_args()
    conditions = harness.Conditions.pinned(args)  # the vCPU threads started later inherit it

    switch = world_switch(args.switch_seconds)
    kick = kick_latency(args.kicks)
    isolation = (
        isolation_costs.measure(args.isolation_rounds, args.switch_seconds / 2)
        if args.isolation_rounds
        else None
    )
    if args.rounds == 0:  # latency only
        report(
            {
                "world_switch": switch,
                "kick": kick,
                "isolation": isolation,
                "machine_before": conditions.machine_before,
            },
            f"microvisor: world switch p50 {switch['latency_us']['median']:.0f} us "
            f"CI {switch['latency_us'].get('median_ci95')}; kick p50 "
            f"{kick['latency_us']['median']:.0f} us" + isolation_costs.summary(isolation),
        )
        return
    cmdline = (
        f"console=ttyS0 run={','.join(WORKLOADS)} mark=1 wait_ms={args.wait_ms} {args.args}"
    ).strip()
    results: dict[str, set[str]] = {w: set() for w in WORKLOADS}
    huge_mib: dict[str, list[float]] = {}

    def runner(name: str, mode: str) -> harness.Runner:
        def once() -> dict[str, float]:
            done = bench_run(mode, cmdline)
            huge_mib.setdefault(name, []).append(done.huge_mib)
            for w in WORKLOADS:
                results[w].add(done.lines[w]["result"])
            return done.cycles(list(WORKLOADS))

        return once

    modes = args.modes.split(",")
    configs = {mode: runner(mode, mode) for mode in modes}
    rounds, baseline = harness.compare(
        args,
        configs,
        "plain" if "plain" in configs else modes[0],
        "microvisor",
        [f"{w}_cpu" for w in WORKLOADS],
        aa_runner=lambda side: runner(side, args.aa),
    )
    out = rounds.to_json()
    overhead = {}
    for mode, per in out["ratios"].items():
        overhead[mode] = {
            w: {
                "percent": round((r["ratio"] - 1) * 100, 3),
                "ci95_percent": [round((x - 1) * 100, 3) for x in r.get("ci95", [])],
            }
            for w, r in per.items()
        }
        for kind, suffix in (("wall", ""), ("cpu", "_cpu")):
            ratios = [per[w + suffix]["ratio"] for w in WORKLOADS if w + suffix in per]
            if ratios:
                overhead[mode][f"mean_{kind}_percent"] = round(
                    (statistics.mean(ratios) - 1) * 100, 3
                )
        if BUSY.match(mode):
            # Half the vCPU is the other instance's by design, and the vCPU thread's
            # CPU time includes its turns: on-CPU cycles / 2 against plain.
            ratios = [per[w + "_cpu"]["ratio"] for w in WORKLOADS if w + "_cpu" in per]
            if ratios:
                overhead[mode]["busy_overhead_percent"] = round(
                    (statistics.mean(ratios) / 2 - 1) * 100, 3
                )
    result = {
        "benchmark": "microvisor",
        "mode": f"A/A {args.aa}" if args.aa else "modes",
        "cmdline": cmdline,
        "metrics": "<workload>: TSC cycles (wall); <workload>_cpu: the cycles the vCPU "
        "thread was on a CPU (its CPU time over wall time between bench.elf's mark and "
        "end lines, read on the vCPU thread), which other processes' load does not change",
        "world_switch": switch,
        "kick": kick,
        "isolation": isolation,
        **out,
        "cpu_overhead_percent": overhead,
        "results_consistent": all(len(v) == 1 for v in results.values()),
        "backing": {n: harness.backing_summary(v, STREAM_MIB) for n, v in huge_mib.items()},
        **conditions.to_json(),
    }
    parts = [
        f"{mode} "
        + ", ".join(
            f"{w} {harness.ci_text(per[w + '_cpu'], percent=True)}"
            for w in WORKLOADS
            if w + "_cpu" in per
        )
        for mode, per in out["ratios"].items()
    ]
    report(
        result,
        f"microvisor: world switch p50 {switch['latency_us']['median']:.0f} us "
        f"CI {switch['latency_us'].get('median_ci95')} p99 {switch['latency_us']['p99']:.0f} us; "
        f"kick p50 {kick['latency_us']['median']:.0f} us; on-CPU overhead vs {baseline} "
        f"({out['method']['rounds']} rounds, {out['method']['stop_reason']}): "
        + "; ".join(parts)
        + "".join(
            f"; {mode} busy overhead {o['busy_overhead_percent']:+.1f}%"
            for mode, o in overhead.items()
            if "busy_overhead_percent" in o
        )
        + isolation_costs.summary(isolation),
    )


if __name__ == "__main__":
    main()
