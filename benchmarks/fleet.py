"""Fleet upgrades through Ansible: N = 1, 2 and 4 webkv nodes on this machine, all at
once (examples/fleet/upgrade.yml with serial 100%) and rolling (serial: 1), and the
example's own policy (a canary, then all the rest) at the largest N,
each node under a light rate-limited load (examples/fleet_upgrade.py does one run).

Per run: the play's wall time; the upgrade span, from the first node's upgrade start to
the last node's end on the nodes' own CLOCK_MONOTONIC reports; Ansible's time apart from
it (its start-up and tasks before the first upgrade, its report play and exit after the
last); each node's upgrade time and longest client-visible stall during its upgrade;
failed requests and lost writes. Configurations alternate round by round
(benchmarks/harness.py); ratios are paired by round: parallel(N)/parallel(1) and
rolling(N)/parallel(N), on the span and on the wall time.

    python benchmarks/fleet.py [--rounds 3] [--nodes 1,2,4]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import harness
from common import report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from fleet_upgrade import run

METRICS = ("wall_s", "span_s", "ansible_before_s", "ansible_after_s")


def measure(nodes: int, mode: str, runs: list[dict]) -> dict[str, float]:
    result = run(nodes, mode)
    per_node = result["per_node"].values()
    if result["playbook_status"] != 0 or any(n["outcome"] != "upgraded" for n in per_node):
        raise SystemExit(f"{nodes} nodes {result['mode']}: the play failed\n{result['lines']}")
    metrics = {name: result[name] for name in METRICS}
    metrics["node_upgrade_ms_max"] = max(n["upgrade_ms"] for n in per_node)
    metrics["stall_ms_max"] = max(n["max_stall_ms"] for n in per_node)
    runs.append({k: v for k, v in result.items() if not k.startswith("_")})
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    harness.add_arguments(parser, harness.Plan(min_rounds=3, max_rounds=3, warmup=0))
    parser.add_argument("--nodes", default="1,2,4", help="fleet sizes, comma-separated")
    args = parser.parse_args()
    plan = harness.plan_from(args)
    sizes = [int(n) for n in args.nodes.split(",")]
    state = harness.machine_state()
    runs: list[dict] = []
    configs = {f"parallel{n}": (lambda n=n: measure(n, "parallel", runs)) for n in sizes}
    configs |= {f"rolling{n}": (lambda n=n: measure(n, "rolling", runs)) for n in sizes if n > 1}
    # The example playbook's own policy (a canary, then the rest at once), for the record.
    configs[f"canary{sizes[-1]}"] = lambda: measure(sizes[-1], "canary", runs)
    rounds = harness.run_rounds(
        configs, f"parallel{sizes[0]}", plan, progress=harness.stderr_progress("fleet")
    )
    samples = rounds.samples
    ratios: dict[str, dict[str, object]] = {}
    for n in sizes[1:]:
        for metric in ("span_s", "wall_s"):
            base = samples[f"parallel{sizes[0]}"][metric]
            ratios[f"parallel{n}/parallel{sizes[0]}:{metric}"] = harness.paired_ratio(
                samples[f"parallel{n}"][metric], base, random.Random(0)
            )
            ratios[f"rolling{n}/parallel{n}:{metric}"] = harness.paired_ratio(
                samples[f"rolling{n}"][metric], samples[f"parallel{n}"][metric], random.Random(0)
            )
    table = {
        name: {metric: round(statistics.median(values), 3) for metric, values in per.items()}
        for name, per in samples.items()
    }
    clean = all(
        node["failed_requests"] == 0 and node["lost_writes"] == 0
        for r in runs
        for node in r["per_node"].values()
    )
    result = {
        "benchmark": "fleet",
        "machine": state,
        "medians": table,
        "ratios": ratios,
        "no_failed_requests_no_lost_writes": clean,
        "rounds": rounds.to_json(),
        "runs": runs,
    }
    big = sizes[-1]
    span = ratios.get(f"parallel{big}/parallel{sizes[0]}:span_s", {}).get("ratio")
    rolling = ratios.get(f"rolling{big}/parallel{big}:span_s", {}).get("ratio")
    report(
        result,
        f"fleet: upgrade span parallel({big})/parallel({sizes[0]}) {span} (goal ≤1.5), "
        f"rolling({big})/parallel({big}) {rolling}; medians "
        + ", ".join(
            f"{name} span {t['span_s']:.2f} s wall {t['wall_s']:.1f} s "
            f"stall {t['stall_ms_max']:.0f} ms"
            for name, t in table.items()
        )
        + f"; failed requests or lost writes: {'none' if clean else 'SOME'}",
    )


if __name__ == "__main__":
    main()
