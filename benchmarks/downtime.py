"""Client-visible downtime of online upgrades (v1 → v2 → v1 …) of a live webkv node
under continuous load, side by side: pyvmm with thread back-ends, pyvmm with
back-end processes (``--device-backends process``) and webkv-native, the same webkv
sources as a host process, under the same clients on the same disk place.

    python benchmarks/downtime.py [--servers thread,process,native] [--upgrades 10]
        [--rounds 5] [--clients 8] [--rate 0] [--workdir /dev/shm] [--pin] [--timeline]

Each round runs every server once, in the order the harness alternates
(benchmarks/harness.py, benchmarks/README.md). A pyvmm run is a fresh node, 1 s of
load, its share of the ``--upgrades`` (split evenly over ``--max-rounds``) 0.5 s
apart, then the node is killed (SIGKILL) and every acknowledged write looked for on
the disk image with the guest's recovery rules. A native run is as long as the pyvmm
runs so far (median), and is checked on its disk
the same way; as it has no upgrades, its "stall" is the longest request in windows
as long as the median upgrade (kvload.window_stalls), and during = baseline = the
whole run.

The table (``table``, pooled over the rounds) gives per server: the median of the
per-upgrade longest stalls (with a bootstrap 95% CI), the max over all upgrades, p99
during the upgrades, p99 outside them (baseline), failed requests, and lost writes.
``ratios`` are the harness's paired per-round ratios to native. Per pyvmm server also
each upgrade's longest request, the phase it started in and the outcome (a
rolled-back upgrade is counted and the run goes on), and each phase's duration.
``--rate`` paces each client (requests/s; 0 = closed loop, the server saturated);
``--workdir`` is where the disk images live (the host file system's fsync latency is
part of every PUT); ``--pin`` puts the servers on one CPU and the clients on the
others.

``--timeline``: for each upgrade, where its longest request's time went (phases, who
had the vCPU, world switches, held interrupts) and the hand-off step by step, from the
trace in the upgrade's report (stall_timeline.py); benchmarks/README.md reads one.

``--no-native`` runs only the default device back-ends (PYVMM_DEVICE_BACKENDS), as
downtime_trees.py does; the top-level fields of the single-server version
(``median_of_per_upgrade_max_stall_ms``, ``per_upgrade``, ...) are kept, for the
first pyvmm server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness
from common import report
from native_anchor import NativeRun
from stall_timeline import breakdown, slow_by_phase, summary_line

from pyvmm.backends import default_device_backends
from pyvmm.control_client import call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from kvload import KvLoad, Sample, percentile, window_stalls
from online_upgrade import Node

PYVMM_SERVERS = ("thread", "process")  # --device-backends of the pyvmm servers
FALLBACK_UPGRADE_S = 0.75  # the window before any upgrade was timed
# the table's columns that pooled_over_native gives as ratios
COMPARED = (
    "median_per_upgrade_stall_ms",
    "max_stall_ms",
    "p99_during_upgrades_ms",
    "baseline_p99_ms",
)


@dataclass
class Trace:
    """One server's runs, pooled over the rounds."""

    stalls: list[float] = field(default_factory=list)  # per upgrade (native: per window)
    during: list[float] = field(default_factory=list)  # request latencies, ms
    baseline: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    reconnects: int = 0
    lost: int = 0
    writes: int = 0
    per_upgrade: list[dict] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    rollbacks: list[dict] = field(default_factory=list)
    totals_ms: list[float] = field(default_factory=list)
    phase_ms: dict[str, list[float]] = field(default_factory=dict)
    switches: list[int] = field(default_factory=list)
    run_s: list[float] = field(default_factory=list)
    isolation: dict = field(default_factory=dict)
    # --timeline: requests during upgrades slower than their run's baseline p99, by
    # the phase they were sent in
    slow_by_phase: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, object]:
        return {
            "median_per_upgrade_stall_ms": round(harness.quantile(self.stalls, 0.5), 3),
            "per_upgrade_stall_ms": harness.median_ci(self.stalls, 3),
            "max_stall_ms": round(max(self.stalls, default=0.0), 3),
            "p99_during_upgrades_ms": round(percentile(self.during, 0.99), 3),
            "baseline_p99_ms": round(percentile(self.baseline, 0.99), 3),
            "baseline_max_ms": round(max(self.baseline, default=0.0), 3),
            "requests": len(self.during) + len(self.baseline),
            "failed_requests": len(self.failures),
            "reconnects": self.reconnects,
            "lost_writes": self.lost,
            "writes_checked_on_disk": self.writes,
        }


def round_metrics(stalls: list[float], during: list[float], baseline: list[float]) -> dict:
    """One run's figures, for the harness's paired ratios."""
    return {
        "median_stall_ms": harness.quantile(stalls, 0.5),
        "max_stall_ms": max(stalls, default=0.0),
        "p99_during_ms": percentile(during, 0.99),
        "baseline_p99_ms": percentile(baseline, 0.99),
    }


def pyvmm_run(backends: str, args: argparse.Namespace, trace: Trace) -> dict:
    """A fresh node with ``backends``, ``args.per_round`` upgrades under load."""
    timelines: list[list[dict]] = []
    reports: list[dict] = []
    env = {"PYVMM_ISOLATION": args.isolation, "PYVMM_DEVICE_BACKENDS": backends}
    with (
        tempfile.TemporaryDirectory(dir=args.workdir) as workdir,
        Node(workdir, env=env) as node,
    ):
        args.pinning.apply_load()  # the client processes started next inherit this
        load = KvLoad(node.port, args.clients, rate=args.rate).start()
        args.pinning.apply_measured()
        load.wait_started()
        time.sleep(1.0)
        version = "v1"
        for _ in range(args.per_round):
            kernel = "webkv-v2.elf" if version == "v1" else "webkv-v1.elf"
            before = call(node.control, "status")["switches"]
            result, timeline = node.upgrade(kernel)
            status = call(node.control, "status")
            trace.switches.append(status["switches"] - before)
            trace.isolation = status.get("isolation", {})
            # A rolled-back upgrade is reported and counted; the run goes on.
            trace.outcomes.append(
                result.get("outcome", "upgraded" if result["ok"] else "rolled_back")
            )
            if not result["ok"]:
                trace.rollbacks.append({k: result.get(k) for k in ("failed_phase", "reason")})
            version = result["after"]
            timelines.append(timeline)
            reports.append(result)
            trace.totals_ms.append(result["total_s"] * 1000)
            for phase in result["phases"]:
                trace.phase_ms.setdefault(phase["phase"], []).append(phase["seconds"] * 1000)
            time.sleep(0.5)
        load.stop()
        node.kill()  # SIGKILL, then every acknowledged write is looked for on the disk
        trace.lost += len(load.lost_on_disk(str(node.disk)))
    trace.writes += load.writes
    trace.failures += load.failures
    trace.reconnects += load.reconnects
    if load.samples:
        trace.run_s.append(load.samples[-1].end - load.samples[0].start)

    def overlaps(sample: Sample, timeline: list[dict]) -> bool:
        return sample.end >= timeline[0]["start"] and sample.start <= timeline[-1]["end"]

    stalls, during = [], []
    outcomes = trace.outcomes[-len(timelines) :]
    for timeline, outcome, upgrade in zip(timelines, outcomes, reports, strict=True):
        samples = [s for s in load.samples if overlaps(s, timeline)]
        during += [s.ms for s in samples]
        worst = max(samples, key=lambda s: s.ms)
        started_in = next(
            (p["phase"] for p in timeline if p["start"] <= worst.start <= p["end"]), "before"
        )
        stalls.append(worst.ms)
        entry = {"max_stall_ms": round(worst.ms, 3), "started_in": started_in, "outcome": outcome}
        if args.timeline:
            entry["timeline"] = breakdown(worst, upgrade)
            print(summary_line(len(trace.per_upgrade), entry["timeline"]), file=sys.stderr)
        trace.per_upgrade.append(entry)
    baseline = [s.ms for s in load.samples if not any(overlaps(s, t) for t in timelines)]
    if args.timeline:
        slow = slow_by_phase(load.samples, timelines, percentile(baseline, 0.99))
        for phase, count in slow.items():
            trace.slow_by_phase[phase] = trace.slow_by_phase.get(phase, 0) + count
    trace.stalls += stalls
    trace.during += during
    trace.baseline += baseline
    return round_metrics(stalls, during, baseline)


def native_run(
    native: NativeRun, args: argparse.Namespace, traces: dict[str, Trace], trace: Trace
) -> dict:
    """webkv-native for as long as the pyvmm runs so far; windows as long as their
    median upgrade."""
    pyvmm = [t for t in traces.values() if t.outcomes]  # the servers that upgraded
    runs = [s for t in pyvmm for s in t.run_s]
    totals = [ms for t in pyvmm for ms in t.totals_ms]
    seconds = statistics.median(runs) if runs else 1.0 + 1.25 * args.per_round
    window_s = statistics.median(totals) / 1000 if totals else FALLBACK_UPGRADE_S
    lost, writes, failed = native.lost, native.writes, len(native.failures)
    samples = native.segment(seconds)
    ms = [s.ms for s in samples]
    stalls = window_stalls(samples, window_s)
    trace.stalls += stalls
    trace.during += ms
    trace.baseline += ms
    trace.failures += native.failures[failed:]
    trace.lost += native.lost - lost
    trace.writes += native.writes - writes
    trace.run_s.append(seconds)
    trace.totals_ms.append(window_s * 1000)  # the window used
    return round_metrics(stalls, ms, ms)


def legacy_fields(name: str, trace: Trace) -> dict[str, object]:
    """The single-server version's top-level fields, for server ``name``."""
    row = trace.row()
    return {
        "legacy_fields_server": name,
        "upgrades": len(trace.outcomes),
        "failed_requests": row["failed_requests"],
        "lost_writes": row["lost_writes"],
        "max_stall_during_upgrades_ms": row["max_stall_ms"],
        "median_of_per_upgrade_max_stall_ms": row["median_per_upgrade_stall_ms"],
        "p99_during_upgrades_ms": row["p99_during_upgrades_ms"],
        "baseline_p99_ms": row["baseline_p99_ms"],
        "per_upgrade": trace.per_upgrade,
        "slower_than_baseline_p99_by_phase_sent": trace.slow_by_phase,
        "upgrade_total_ms_median": round(harness.quantile(trace.totals_ms, 0.5), 1),
        "switches_per_upgrade": harness.describe(trace.switches, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servers", default="thread,process,native")
    parser.add_argument(
        "--no-native",
        dest="native",
        action="store_false",
        help="only pyvmm with the default device back-ends (downtime_trees.py)",
    )
    parser.add_argument("--upgrades", type=int, default=10, help="per pyvmm server, in all")
    parser.add_argument("--timeline", action="store_true", help="see the module's docstring")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s per client")
    parser.add_argument("--workdir", default=None, help="parent directory of the disk images")
    parser.add_argument(
        "--isolation",
        default="symmetric",
        help="the nodes' memory isolation (none: the baseline without it)",
    )
    parser.add_argument("--aa", default=None, help="A/A: this server against itself")
    harness.add_arguments(
        parser, harness.Plan(min_rounds=5, max_rounds=5, warmup=0, time_cap_s=1200)
    )
    args = parser.parse_args()
    if args.upgrades < 1:
        sys.exit("--upgrades: at least 1")
    rounds = max(1, args.rounds, args.max_rounds)  # the rounds that run (harness.plan_from)
    args.per_round = -(-args.upgrades // rounds)  # rounded up
    servers = args.servers.split(",") if args.native else [default_device_backends()]
    unknown = [s for s in servers if s not in (*PYVMM_SERVERS, "native")]
    if unknown:
        sys.exit(f"--servers: unknown {unknown} (thread, process, native)")
    conditions = harness.Conditions.pinned(args)
    args.pinning = conditions.pinning
    traces = {name: Trace() for name in servers}
    native = NativeRun(args.workdir, args.clients, args.rate, args.pinning)

    def runner(name: str):
        """A server's run, recorded under ``name`` (an A/A side ends in ')."""
        trace = traces.setdefault(name, Trace())
        if name.rstrip("'") == "native":
            return lambda: native_run(native, args, traces, trace)
        return lambda: pyvmm_run(name.rstrip("'"), args, trace)

    baseline = "native" if "native" in servers else servers[0]
    rounds, baseline = harness.compare(
        args, {name: runner(name) for name in servers}, baseline, "downtime", aa_runner=runner
    )
    table = {name: trace.row() for name, trace in traces.items() if trace.stalls}
    pooled = {}
    if "native" in table:
        anchor = table["native"]
        for name, row in table.items():
            if name != "native":
                pooled[name] = {
                    key: round(row[key] / anchor[key], 3) if anchor[key] else None
                    for key in COMPARED
                }
    details = {
        name: {
            "outcomes": {o: t.outcomes.count(o) for o in sorted(set(t.outcomes))},
            "rollbacks": t.rollbacks,
            "per_upgrade": t.per_upgrade,
            "upgrade_total_ms": harness.describe(t.totals_ms, 1),
            "phase_ms": {k: harness.describe(v, 3) for k, v in t.phase_ms.items()},
            "switches_per_upgrade": harness.describe(t.switches, 1),
            "isolation": t.isolation,
            "slower_than_baseline_p99_by_phase_sent": t.slow_by_phase,  # --timeline
        }
        for name, t in traces.items()
        if name != "native" and t.stalls
    }
    native_window_ms = traces["native"].totals_ms if "native" in traces else []
    first = next((n for n in servers if n in details), None)
    result = {
        "benchmark": "downtime",
        "servers": servers,
        "upgrades_per_run": args.per_round,
        "clients": args.clients,
        "rate_per_client": args.rate or "closed loop",
        "isolation_mode": args.isolation,
        "table": table,
        "pooled_over_native": pooled,
        **rounds.to_json(),
        "pyvmm": details,
        "native_window_ms": harness.describe(native_window_ms, 1),
        **(legacy_fields(first, traces[first]) if first else {}),
        **conditions.to_json(),
    }
    rows = "; ".join(
        f"{name}: stall median {row['median_per_upgrade_stall_ms']:.1f} max "
        f"{row['max_stall_ms']:.1f}, p99 during {row['p99_during_upgrades_ms']:.1f}, "
        f"baseline p99 {row['baseline_p99_ms']:.1f} ms, failed {row['failed_requests']}, "
        f"lost {row['lost_writes']}/{row['writes_checked_on_disk']}"
        + (f", {traces[name].outcomes.count('upgraded')} upgraded" if name in details else "")
        for name, row in table.items()
    )
    ratios = "; ".join(
        f"{name}/native stall {r['median_per_upgrade_stall_ms']}, max {r['max_stall_ms']}, "
        f"p99 during {r['p99_during_upgrades_ms']}"
        for name, r in pooled.items()
    )
    report(
        result,
        f"downtime: {len(rounds.orders)} rounds x {args.per_round} upgrades per pyvmm server "
        f"({args.clients} clients); {rows}" + (f"; {ratios}" if ratios else ""),
    )


if __name__ == "__main__":
    main()
