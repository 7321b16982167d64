"""Client-visible downtime of online upgrades: ≥10 upgrades (v1 → v2 → v1 …) of a
live webkv node under continuous load, on one node.

    python benchmarks/downtime.py [--upgrades 10] [--clients 8] [--rate 0]
                                  [--workdir /dev/shm] [--pin]

Reports the longest stall any request saw and the p99 latency during the hand-offs,
for each upgrade the longest request, the phase it started in and its outcome (a
rolled-back upgrade is counted and the run goes on), each phase's duration, the
failed requests, and the acknowledged writes lost: the node is killed (SIGKILL) at
the end and the disk image read with the guest's recovery rules. The same load
outside the upgrades is the baseline. ``--rate`` paces each client (requests/s;
0 = closed loop, the server saturated); ``--workdir`` is where the disk image lives
(the host file system's fsync latency is part of every PUT). Statistics and the
machine's state come from benchmarks/harness.py; the median per-upgrade stall has a
bootstrap 95% CI. ``--pin`` puts the node on one CPU and the clients on the others.

The anchor (``--native``, on by default): webkv-native, the same webkv sources as a
host process, under the same clients on the same disk place, for a run as long as
pyvmm's, half before and half after it (ABA). Its longest request in windows the
length of an upgrade stands against each upgrade's longest stall; ``vs_native``
gives the ratios (native_anchor.py).

``--timeline``: for each upgrade, where its longest request's time went (phases, who
had the vCPU, world switches, held interrupts) and the hand-off step by step, from the
trace in the upgrade's report (stall_timeline.py); benchmarks/README.md reads one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from common import report
from native_anchor import NativeRun, versus_native
from stall_timeline import breakdown, slow_by_phase, summary_line

from pyvmm.control_client import call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from kvload import KvLoad, percentile
from online_upgrade import Node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upgrades", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s per client")
    parser.add_argument("--workdir", default=None, help="parent directory of the disk image")
    parser.add_argument("--pin", action="store_true", help="node and clients on separate CPUs")
    parser.add_argument("--native", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="per upgrade, where its longest request's time went (stall_timeline.py)",
    )
    parser.add_argument(
        "--isolation",
        default="symmetric",
        help="the node's memory isolation (none: the baseline without it)",
    )
    args = parser.parse_args()
    pinning = harness.Pinning.split(args.pin)
    state_before = harness.machine_state()
    phase_ms: dict[str, list[float]] = {}
    timelines: list[list[dict]] = []
    reports: list[dict] = []
    totals: list[float] = []
    outcomes: list[str] = []
    rollbacks: list[dict] = []
    switches: list[int] = []  # world switches per upgrade, each with its memory-slot change
    isolation: dict = {}
    pinning.apply_measured()  # the node's processes inherit this
    native = NativeRun(args.workdir, args.clients, args.rate, pinning) if args.native else None
    if native:  # first half: about half of pyvmm's run (1 s + ~0.75 s per upgrade)
        native.segment((1.0 + 0.75 * args.upgrades) / 2)
    with (
        tempfile.TemporaryDirectory(dir=args.workdir) as workdir,
        Node(workdir, env={"PYVMM_ISOLATION": args.isolation}) as node,
    ):
        pinning.apply_load()  # the client threads started next inherit this
        load = KvLoad(node.port, args.clients, rate=args.rate).start()
        time.sleep(1.0)
        version = "v1"
        for _ in range(args.upgrades):
            kernel = "webkv-v2.elf" if version == "v1" else "webkv-v1.elf"
            before = call(node.control, "status")["switches"]
            result, timeline = node.upgrade(kernel)
            status = call(node.control, "status")
            switches.append(status["switches"] - before)
            isolation = status.get("isolation", {})
            # A rolled-back upgrade is reported and counted; the run goes on.
            outcomes.append(result.get("outcome", "upgraded" if result["ok"] else "rolled_back"))
            if not result["ok"]:
                rollbacks.append({k: result.get(k) for k in ("failed_phase", "reason")})
            version = result["after"]
            timelines.append(timeline)
            reports.append(result)
            totals.append(result["total_s"] * 1000)
            for phase in result["phases"]:
                phase_ms.setdefault(phase["phase"], []).append(phase["seconds"] * 1000)
            time.sleep(0.5)
        load.stop()
        node.kill()  # SIGKILL, then every acknowledged write is looked for on the disk
        lost = load.lost_on_disk(str(node.disk))
    if native:  # second half: the rest of pyvmm's length
        pyvmm_s = load.samples[-1].end - load.samples[0].start if load.samples else 0.0
        native.segment(max(1.0, pyvmm_s - native.seconds))

    def overlaps(sample, timeline) -> bool:
        return sample.end >= timeline[0]["start"] and sample.start <= timeline[-1]["end"]

    per_upgrade = []
    during: list[float] = []
    for timeline, upgrade_report in zip(timelines, reports, strict=True):
        samples = [s for s in load.samples if overlaps(s, timeline)]
        during += [s.ms for s in samples]
        worst = max(samples, key=lambda s: s.ms)
        started_in = next(
            (p["phase"] for p in timeline if p["start"] <= worst.start <= p["end"]), "before"
        )
        per_upgrade.append(
            {"max_stall_ms": round(worst.ms, 3), "started_in": started_in, "outcome": None}
        )
        if args.timeline:
            per_upgrade[-1]["timeline"] = breakdown(worst, upgrade_report)
            print(summary_line(len(per_upgrade) - 1, per_upgrade[-1]["timeline"]), file=sys.stderr)
    for entry, outcome in zip(per_upgrade, outcomes, strict=True):
        entry["outcome"] = outcome
    baseline = [s.ms for s in load.samples if not any(overlaps(s, t) for t in timelines)]
    slow = slow_by_phase(load.samples, timelines, percentile(baseline, 0.99))
    stalls = [u["max_stall_ms"] for u in per_upgrade]
    result = {
        "benchmark": "downtime",
        "upgrades": args.upgrades,
        "clients": args.clients,
        "rate_per_client": args.rate or "closed loop",
        "requests": len(load.samples),
        "failed_requests": len(load.failures),
        "reconnects": load.reconnects,
        "outcomes": {o: outcomes.count(o) for o in sorted(set(outcomes))},
        "rollbacks": rollbacks,
        "lost_writes": len(lost),  # on the disk image after SIGKILL (webkv_disk.py)
        "writes_checked": load.writes,
        "acknowledged_writes": len(load.acked),
        "max_stall_during_upgrades_ms": max(stalls),
        "median_of_per_upgrade_max_stall_ms": round(statistics.median(stalls), 3),
        "upgrades_within_10ms": sum(s <= 10 for s in stalls),
        "p99_during_upgrades_ms": round(percentile(during, 0.99), 3),
        "baseline_max_ms": round(max(baseline, default=0.0), 3),
        "baseline_p99_ms": round(percentile(baseline, 0.99), 3),
        "per_upgrade": per_upgrade,
        **({"slower_than_baseline_p99_by_phase_sent": slow} if args.timeline else {}),
        "upgrade_total_ms_median": round(statistics.median(totals), 1),
        # What memory isolation can add to an upgrade: its world switches, each with a
        # slot change (median over the node's life; docs/decisions.md, isolation).
        "isolation_mode": args.isolation,
        "switches_per_upgrade": harness.describe(switches, 1),
        "isolation": isolation,
        "phase_ms_median": {k: round(statistics.median(v), 2) for k, v in phase_ms.items()},
        "per_upgrade_max_stall_ms": harness.median_ci(stalls, 3),
        "phase_ms": {k: harness.describe(v, 3) for k, v in phase_ms.items()},
        **(
            versus_native(native, stalls, during, baseline, statistics.median(totals))
            if native
            else {}
        ),
        "pinning": pinning.to_json(),
        "machine_before": state_before,
        "machine_after": harness.machine_state(),
    }
    report(
        result,
        f"downtime: {args.upgrades} upgrades under load: max stall {max(stalls):.1f} ms "
        f"(goal <= 10; median per upgrade {result['median_of_per_upgrade_max_stall_ms']:.1f} "
        f"CI {result['per_upgrade_max_stall_ms'].get('median_ci95')}, "
        f"{result['upgrades_within_10ms']} within 10 ms), p99 during upgrades "
        f"{result['p99_during_upgrades_ms']:.1f} ms; baseline max "
        f"{result['baseline_max_ms']:.1f} p99 {result['baseline_p99_ms']:.1f} ms; "
        f"failed {result['failed_requests']}, lost {result['lost_writes']} of "
        f"{result['writes_checked']} checked on disk; outcomes {result['outcomes']}; "
        f"upgrade median "
        f"{result['upgrade_total_ms_median']:.0f} ms, world switches per upgrade "
        f"{statistics.median(switches):.0f} (slot change p50 "
        f"{isolation.get('slot_change_us_p50')} us each)"
        + (f"; {result['vs_native']['summary']}" if native else ""),
    )


if __name__ == "__main__":
    main()
