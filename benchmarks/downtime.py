"""Client-visible downtime of online upgrades: ≥10 upgrades (v1 → v2 → v1 …) of a
live webkv node under continuous load, on one node.

    python benchmarks/downtime.py [--upgrades 10] [--clients 8]

Reports the longest stall any request saw and the p99 latency during the hand-offs,
each phase's duration, and the failed requests and lost acknowledged writes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from kvload import KvLoad, longest_stall_ms, percentile
from online_upgrade import Node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upgrades", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    phase_seconds: dict[str, list[float]] = {}
    windows: list[tuple[float, float]] = []
    totals: list[float] = []
    with tempfile.TemporaryDirectory() as workdir, Node(workdir) as node:
        load = KvLoad(node.port, args.clients).start()
        time.sleep(1.0)
        for i in range(args.upgrades):
            kernel = "webkv-v2.elf" if i % 2 == 0 else "webkv-v1.elf"
            result, timeline = node.upgrade(kernel)
            if not result["ok"]:
                sys.exit(f"upgrade {i} rolled back: {result}")
            windows.append((timeline[0]["start"], timeline[-1]["end"]))
            totals.append(result["total_s"] * 1000)
            for phase in result["phases"]:
                phase_seconds.setdefault(phase["phase"], []).append(phase["seconds"] * 1000)
            time.sleep(0.5)
        load.stop()
        lost = load.lost_writes()
    during = [s.ms for s in load.samples if any(s.end >= a and s.start <= b for a, b in windows)]
    result = {
        "benchmark": "downtime",
        "upgrades": args.upgrades,
        "clients": args.clients,
        "requests": len(load.samples),
        "failed_requests": len(load.failures),
        "lost_writes": len(lost),
        "acknowledged_writes": len(load.acked),
        "reconnects": load.reconnects,
        "max_stall_ms": round(longest_stall_ms(load.samples), 3),
        "max_stall_during_upgrades_ms": round(max(during, default=0.0), 3),
        "p99_during_upgrades_ms": round(percentile(during, 0.99), 3),
        "p99_overall_ms": round(percentile([s.ms for s in load.samples], 0.99), 3),
        "upgrade_total_ms_median": round(statistics.median(totals), 1),
        "phase_ms_median": {k: round(statistics.median(v), 2) for k, v in phase_seconds.items()},
    }
    report(
        result,
        f"downtime: {args.upgrades} upgrades under load: max stall during upgrades "
        f"{result['max_stall_during_upgrades_ms']:.1f} ms (goal <= 10; overall "
        f"{result['max_stall_ms']:.1f} ms), p99 during upgrades "
        f"{result['p99_during_upgrades_ms']:.1f} ms, "
        f"failed {result['failed_requests']}, lost {result['lost_writes']} of "
        f"{result['acknowledged_writes']} acknowledged; upgrade median "
        f"{result['upgrade_total_ms_median']:.0f} ms",
    )


if __name__ == "__main__":
    main()
