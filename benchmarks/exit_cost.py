"""Exit cost: bench.elf's `portio` workload (N `outb` to port 0x80, which no device
claims, from CPL3: each one a VM exit to the VMM and back) under pyvmm and under
QEMU microvm, alternated in rounds by benchmarks/harness.py. The ratio is pyvmm's
round trip over QEMU's, with a bootstrap 95% CI. ``round_trip_us`` is wall time (the
guest's TSC); ``cpu_us`` is the CPU time per exit of the whole VMM process (all its
threads, from rusage), as the difference between a run with N exits and one with
none, which cancels start-up and boot: it holds however loaded the machine is.

    python benchmarks/exit_cost.py [--n 40000] [--rounds 10] [--aa pyvmm] [--pin]
"""

from __future__ import annotations

import argparse

import harness
from bench_runs import host_tsc_khz, under_pyvmm, under_qemu
from common import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=40000, help="exits per run")
    parser.add_argument("--aa", default=None, help="A/A: this platform against itself")
    harness.add_arguments(
        parser, harness.Plan(min_rounds=10, max_rounds=30, precision=0.01, time_cap_s=240)
    )
    args = parser.parse_args()
    conditions = harness.Conditions.pinned(args)
    khz = host_tsc_khz()
    workload = f"run=portio n_portio={args.n}"

    def per_exit(runner) -> harness.Runner:
        def once() -> dict[str, float]:
            cpu = harness.children_cpu_s()
            runner("run=portio n_portio=0", khz)
            cpu_none = harness.children_cpu_s() - cpu
            line = runner(workload, khz).lines["portio"]
            cpu_all = harness.children_cpu_s() - cpu - cpu_none
            return {
                "round_trip_us": line["cycles"] / line["work"] / khz * 1000,
                "cpu_us": (cpu_all - cpu_none) / line["work"] * 1e6,
            }

        return once

    configs = {"pyvmm": per_exit(under_pyvmm), "qemu": per_exit(under_qemu)}
    rounds, baseline = harness.compare(args, configs, "qemu", "exit_cost")
    out = rounds.to_json()
    result: dict[str, object] = {
        "benchmark": "exit_cost",
        "exits_per_run": args.n,
        "tsc_khz": khz,
        **out,
        "exits_per_second_median": {
            name: round(1e6 / per["round_trip_us"]["median"])
            for name, per in out["configs"].items()
        },
        **conditions.to_json(),
    }
    medians = {n: per["round_trip_us"]["median"] for n, per in out["configs"].items()}
    ratios = "; ".join(
        f"{name}/{baseline} round trip {harness.ci_text(per['round_trip_us'])}, "
        f"CPU per exit {harness.ci_text(per['cpu_us'])}"
        for name, per in out["ratios"].items()
    )
    report(
        result,
        f"exit_cost: {out['method']['rounds']} rounds of {args.n} exits; "
        + ", ".join(f"{n} {us:.2f} us/exit ({1e6 / us:.0f} exits/s)" for n, us in medians.items())
        + f"; {ratios}",
    )


if __name__ == "__main__":
    main()
