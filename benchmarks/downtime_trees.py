"""downtime.py for several source trees side by side (before/after a change).

    python benchmarks/downtime_trees.py --trees base=/path/to/checkout,new=. \
        [--upgrades 5] [--clients 8] [--rounds 4]

Each round runs every tree's own benchmarks/downtime.py once (``--no-native``, its
pyvmm first on PYTHONPATH, its guest kernels), alternated round by round by the
harness; the paired ratios (the last tree over the first, median of per-round ratios
with a bootstrap CI over rounds) cancel the drift of a shared, loaded machine. Any
tree older than this file works as well: only downtime.py's JSON is read
(``--timeline`` needs trees whose downtime.py has that option).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import harness
from common import report

ROOT = Path(__file__).resolve().parent.parent
# What is paired per round (from each run's downtime.py JSON).
METRICS = {
    "median_stall_ms": lambda r: r["median_of_per_upgrade_max_stall_ms"],
    "max_stall_ms": lambda r: r["max_stall_during_upgrades_ms"],
    "p99_during_upgrades_ms": lambda r: r["p99_during_upgrades_ms"],
    "baseline_p99_ms": lambda r: r["baseline_p99_ms"],
    "upgrade_ms": lambda r: r["upgrade_total_ms_median"],
    "switches_per_upgrade": lambda r: r["switches_per_upgrade"]["median"],
}
# With --timeline (trees whose downtime.py has it): the hand-off on its own, from the
# release asked to B serving, and its world switches (medians over a run's upgrades).
HANDOFF = {
    "handoff_ms": lambda h: h["total_ms"],
    "handoff_switches": lambda h: h["world_switches"] + 1,  # +1: never 0 in a ratio
    # release asked → A's "released" → acquire sent to B → B's "serving"
    "release_ms": lambda h: step(h, "A released"),
    "released_to_acquire_sent_ms": lambda h: step(h, "listeners attached") - step(h, "A released"),
    "acquire_ms": lambda h: step(h, "B serving") - step(h, "listeners attached"),
}


def step(handoff: dict, what: str) -> float:
    """When the hand-off step ``what`` (its first words) came, ms after the release."""
    return next(ms for ms, name in handoff["steps_ms"] if name.startswith(what))


def run_tree(tree: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(tree / "benchmarks" / "downtime.py"), "--no-native"]
    command += ["--upgrades", str(args.upgrades), "--clients", str(args.clients)]
    if args.timeline:
        command.append("--timeline")
    done = subprocess.run(
        command,
        env=dict(os.environ, PYTHONPATH=str(tree)),
        cwd=tree / "benchmarks",
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode:
        raise SystemExit(f"downtime.py of {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trees", default=f"this={ROOT}", help="NAME=PATH,... (last: measured)")
    parser.add_argument("--upgrades", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--aa", default=None, help="A/A: this tree against itself")
    parser.add_argument("--timeline", action="store_true", help="hand-off figures too")
    harness.add_arguments(
        parser, harness.Plan(min_rounds=4, max_rounds=4, warmup=0, time_cap_s=1800)
    )
    args = parser.parse_args()
    trees = {k: Path(v).resolve() for k, v in (i.split("=", 1) for i in args.trees.split(","))}
    state_before = harness.machine_state()
    stalls: dict[str, list[float]] = {name: [] for name in trees}

    def runner(name: str):
        def once() -> dict[str, float]:
            result = run_tree(trees[name], args)
            stalls[name] += [u["max_stall_ms"] for u in result["per_upgrade"]]
            metrics = {metric: pick(result) for metric, pick in METRICS.items()}
            if args.timeline:
                handoffs = [u["timeline"]["handoff"] for u in result["per_upgrade"]]
                for metric, pick in HANDOFF.items():
                    metrics[metric] = max(0.001, statistics.median(pick(h) for h in handoffs if h))
            return metrics

        return once

    first, last = next(iter(trees)), list(trees)[-1]
    rounds, baseline = harness.compare(
        args, {name: runner(name) for name in trees}, first, "downtime_trees"
    )
    out = rounds.to_json()
    per_upgrade = {name: harness.median_ci(values, 3) for name, values in stalls.items()}
    result = {
        "benchmark": "downtime_trees",
        "trees": {name: str(path) for name, path in trees.items()},
        "upgrades_per_run": args.upgrades,
        "clients": args.clients,
        "per_upgrade_max_stall_ms": per_upgrade,
        **out,
        "machine_before": state_before,
        "machine_after": harness.machine_state(),
    }
    ratios = out["ratios"].get(last if not args.aa else f"{args.aa}'", {})
    text = "; ".join(f"{m} {harness.ci_text(r)}" for m, r in ratios.items())
    loads = [result[k]["loadavg"] for k in ("machine_before", "machine_after")]
    report(
        result,
        f"downtime_trees: {last} / {baseline if not args.aa else args.aa}: {text}; per-upgrade "
        f"stall median {', '.join(f'{n} {statistics.median(v):.1f}' for n, v in stalls.items())}"
        f" ms; load average {loads}",
    )


if __name__ == "__main__":
    main()
