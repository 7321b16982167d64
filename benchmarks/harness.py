"""The one measuring method of every benchmark (issue 10).

Configurations are run in rounds, each round running every configuration once, in an
order that alternates (AB, BA, AB … so a linear drift hits every configuration alike)
or is a random permutation per round. Warm-up runs are discarded. Rounds go on until
at least ``min_rounds`` are done and the 95% confidence interval of every ratio to
the baseline is within ``precision`` (relative half-width), or ``max_rounds`` or the
time cap is reached. A ratio is the median of the per-round ratios (paired by round,
so the drift between rounds cancels); its CI is a percentile bootstrap that resamples
whole rounds. Pure Python (statistics, random) so it is unit-tested without KVM.

Beside each result goes the machine's state (load, transparent huge pages, kernel,
busy processes), the CPU pinning used, and, when asked, the peak huge-page backing of
a measured process (from /proc/PID/smaps_rollup).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Metrics = Mapping[str, float]
Runner = Callable[[], Metrics]
CONFIDENCE = 0.95
RESAMPLES = 2000


# ---- statistics ----


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, R type 7)."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def describe(values: Sequence[float], digits: int = 6) -> dict[str, float]:
    """Median, spread (min/max, quartiles and IQR), and tail percentiles."""
    if not values:
        return {"n": 0}
    q1, q3 = quantile(values, 0.25), quantile(values, 0.75)
    out = {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "p90": quantile(values, 0.90),
        "p99": quantile(values, 0.99),
    }
    return {k: (v if k == "n" else round(v, digits)) for k, v in out.items()}


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[Sequence[float]], float] = statistics.median,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    rng: random.Random | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values``."""
    if len(values) < 2:
        raise ValueError("a confidence interval needs at least two values")
    rng = rng or random.Random(0)
    n = len(values)
    estimates = sorted(statistic(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return quantile(estimates, tail), quantile(estimates, 1 - tail)


def paired_ratio(
    values: Sequence[float], baseline: Sequence[float], rng: random.Random | None = None
) -> dict[str, object]:
    """values[i] / baseline[i] per round: the median ratio and its bootstrap 95% CI
    (resampling rounds, which keeps each pair together)."""
    if len(values) != len(baseline):
        raise ValueError("paired samples differ in length")
    ratios = [a / b for a, b in zip(values, baseline, strict=True)]
    ratio = statistics.median(ratios)
    out: dict[str, object] = {"ratio": round(ratio, 6), "rounds": len(ratios)}
    if len(ratios) >= 2:
        low, high = bootstrap_ci(ratios, rng=rng)
        out["ci95"] = [round(low, 6), round(high, 6)]
        out["ci95_half_width_percent"] = round(half_width(ratio, low, high) * 100, 4)
    return out


def half_width(estimate: float, low: float, high: float) -> float:
    """The CI's larger distance from the estimate, relative to it."""
    return max(high - estimate, estimate - low) / abs(estimate)


def median_ci(values: Sequence[float], digits: int = 6) -> dict[str, object]:
    """describe() plus a distribution-free 95% CI of the median, for many samples
    within one run (latencies): the order statistics at ranks n/2 -+ 1.96 sqrt(n)/2
    (the binomial interval; cheap for 10,000 samples, unlike a bootstrap)."""
    out: dict[str, object] = dict(describe(values, digits))
    n = len(values)
    if n >= 2:
        ordered = sorted(values)
        spread = 1.959964 * math.sqrt(n) / 2
        low = max(0, math.floor(n / 2 - spread) - 1)
        high = min(n - 1, math.ceil(n / 2 + spread))
        out["median_ci95"] = [round(ordered[low], digits), round(ordered[high], digits)]
    return out


# ---- rounds ----


def round_order(names: Sequence[str], index: int, order: str, rng: random.Random) -> list[str]:
    """The configurations of round ``index``: alternating direction, or shuffled."""
    if order == "alternate":
        return list(names) if index % 2 == 0 else list(reversed(names))
    if order == "random":
        shuffled = list(names)
        rng.shuffle(shuffled)
        return shuffled
    raise ValueError(f"unknown order {order!r} (alternate or random)")


@dataclass
class Plan:
    min_rounds: int = 10
    max_rounds: int = 30
    warmup: int = 1
    precision: float = 0.005  # relative CI half-width that ends the rounds early
    time_cap_s: float = 300.0
    order: str = "alternate"
    seed: int = 1
    # the metrics whose ratios must reach ``precision`` (empty: all of them)
    target_metrics: tuple[str, ...] = ()


@dataclass
class Rounds:
    """Samples of every configuration, by metric, one per round."""

    plan: Plan
    baseline: str
    names: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    stop_reason: str = ""
    elapsed_s: float = 0.0

    def ratios(self, rng_seed: int = 0) -> dict[str, dict[str, dict[str, object]]]:
        base = self.samples.get(self.baseline, {})
        out: dict[str, dict[str, dict[str, object]]] = {}
        for name in self.names:
            if name == self.baseline:
                continue
            out[name] = {
                metric: paired_ratio(values, base[metric], random.Random(rng_seed))
                for metric, values in self.samples.get(name, {}).items()
                if metric in base
            }
        return out

    def widest(self) -> float:
        """The largest relative CI half-width over every ratio (inf before two rounds)."""
        target = self.plan.target_metrics
        widths = [
            r.get("ci95_half_width_percent", math.inf)
            for per_metric in self.ratios().values()
            for metric, r in per_metric.items()
            if not target or metric in target
        ]
        return max(widths, default=math.inf) / 100

    def to_json(self) -> dict[str, object]:
        ratios = self.ratios()
        for per_metric in ratios.values():
            for r in per_metric.values():
                width = r.get("ci95_half_width_percent", math.inf) / 100
                r["within_precision"] = width <= self.plan.precision
        return {
            "method": {
                "order": self.plan.order,
                "seed": self.plan.seed,
                "warmup_runs_discarded": self.plan.warmup,
                "rounds": len(self.orders),
                "min_rounds": self.plan.min_rounds,
                "max_rounds": self.plan.max_rounds,
                "precision_target_percent": self.plan.precision * 100,
                "precision_metrics": list(self.plan.target_metrics) or "all",
                "time_cap_s": self.plan.time_cap_s,
                "stop_reason": self.stop_reason,
                "elapsed_s": round(self.elapsed_s, 2),
                "round_s": describe(self.round_seconds, 3),
                "ratio": "median of per-round ratios to the baseline, 95% percentile "
                f"bootstrap CI over rounds ({RESAMPLES} resamples)",
                "baseline": self.baseline,
            },
            "configs": {
                name: {
                    metric: {**describe(values), "samples": values}
                    for metric, values in per_metric.items()
                }
                for name, per_metric in self.samples.items()
            },
            "ratios": ratios,
        }


def run_rounds(
    configs: Mapping[str, Runner],
    baseline: str,
    plan: Plan,
    clock: Callable[[], float] = time.monotonic,
    progress: Callable[[str], None] | None = None,
) -> Rounds:
    """Alternate ``configs`` round by round (see the module's docstring)."""
    if baseline not in configs:
        raise ValueError(f"baseline {baseline!r} is not a configuration")
    names = list(configs)
    rng = random.Random(plan.seed)
    result = Rounds(plan, baseline, names)
    start = clock()
    for w in range(plan.warmup):
        for name in round_order(names, w, plan.order, rng):
            configs[name]()
    while True:
        done = len(result.orders)
        elapsed = clock() - start
        if done >= plan.max_rounds:
            result.stop_reason = "max_rounds"
            break
        if done >= plan.min_rounds and result.widest() <= plan.precision:
            result.stop_reason = "precision_reached"
            break
        per_round = statistics.mean(result.round_seconds) if result.round_seconds else 0.0
        if elapsed + per_round > plan.time_cap_s:
            result.stop_reason = "time_cap"
            break
        began = clock()
        order = round_order(names, done, plan.order, rng)
        for name in order:
            metrics = configs[name]()
            per = result.samples.setdefault(name, {})
            for metric, value in metrics.items():
                per.setdefault(metric, []).append(float(value))
        result.orders.append(order)
        result.round_seconds.append(clock() - began)
        if progress:
            progress(f"round {done + 1}: widest CI ±{result.widest() * 100:.3f}%")
    result.elapsed_s = clock() - start
    return result


def aa_configs(configs: Mapping[str, Runner], name: str) -> dict[str, Runner]:
    """An A/A comparison: configuration ``name`` against itself."""
    return {name: configs[name], f"{name}'": configs[name]}


# ---- pinning ----


@dataclass
class Pinning:
    """CPUs of the measured process (and the threads it creates) and of load generators."""

    measured: set[int] | None = None
    load: set[int] | None = None

    @classmethod
    def split(cls, enabled: bool) -> Pinning:
        """Measured on the last CPU, load generators on the others."""
        if not enabled:
            return cls()
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(set(cpus), set(cpus))
        return cls({cpus[-1]}, set(cpus[:-1]))

    def apply_measured(self) -> None:
        """Pin this thread: threads and child processes started after inherit it."""
        if self.measured:
            os.sched_setaffinity(0, self.measured)

    def apply_load(self) -> None:
        """Pin this thread to the load CPUs (for load generator threads started after)."""
        if self.load:
            os.sched_setaffinity(0, self.load)

    def load_preexec(self) -> Callable[[], None] | None:
        """For subprocess.Popen(preexec_fn=...): the load generator's CPUs."""
        if not self.load:
            return None
        cpus = set(self.load)
        return lambda: os.sched_setaffinity(0, cpus)

    def to_json(self) -> dict[str, object]:
        return {
            "pinned": self.measured is not None,
            "measured_cpus": sorted(self.measured) if self.measured else None,
            "load_cpus": sorted(self.load) if self.load else None,
        }


# ---- machine state ----


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _thp_choice(path: str) -> str:
    text = _read(path)
    picked = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return picked[0] if picked else text


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    out: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _read(f"/proc/{entry.name}/stat")
        if not stat:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(entry.name)] = (comm, int(fields[11]) + int(fields[12]))  # utime + stime
    return out


def busy_processes(window_s: float = 0.5, threshold: float = 0.1) -> list[dict[str, object]]:
    """Other processes using more than ``threshold`` of a CPU over ``window_s``."""
    hz = os.sysconf("SC_CLK_TCK")
    before = _cpu_ticks()
    time.sleep(window_s)
    after = _cpu_ticks()
    busy = []
    for pid, (comm, ticks) in after.items():
        if pid == os.getpid() or pid not in before:
            continue
        share = (ticks - before[pid][1]) / hz / window_s
        if share > threshold:
            busy.append({"pid": pid, "comm": comm, "cpu": round(share, 2)})
    return sorted(busy, key=lambda p: -p["cpu"])


def machine_state() -> dict[str, object]:
    thp = "/sys/kernel/mm/transparent_hugepage"
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg": [float(x) for x in _read("/proc/loadavg").split()[:3]],
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "thp": {
            "enabled": _thp_choice(f"{thp}/enabled"),
            "shmem_enabled": _thp_choice(f"{thp}/shmem_enabled"),
            "defrag": _thp_choice(f"{thp}/defrag"),
        },
        "busy_processes": busy_processes(),
    }


@dataclass
class Conditions:
    """What a benchmark ran under: its pinning and the machine's state before and after."""

    pinning: Pinning
    machine_before: dict[str, object]

    @classmethod
    def pinned(cls, args: argparse.Namespace) -> Conditions:
        """--pin's split with this thread on the measured CPUs (threads and processes
        started later inherit it), then the machine's state."""
        pinning = Pinning.split(args.pin)
        pinning.apply_measured()
        return cls(pinning, machine_state())

    def to_json(self) -> dict[str, object]:
        """The result's "pinning", "machine_before" and (read now) "machine_after"."""
        return {
            "pinning": self.pinning.to_json(),
            "machine_before": self.machine_before,
            "machine_after": machine_state(),
        }


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's reaped children (all their
    threads): the difference around one subprocess is that process's CPU time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---- memory backing ----

BACKING_KEYS = ("Rss", "AnonHugePages", "ShmemPmdMapped", "FilePmdMapped")


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process it started, and they started (any thread's
    children, from /proc/PID/task/*/children), parents first; [] once it is gone."""
    tree, todo = [], [pid]
    while todo:
        parent = todo.pop(0)
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        tree.append(parent)
        for task in tasks:
            todo += [int(child) for child in _read(f"/proc/{parent}/task/{task}/children").split()]
    return tree


def smaps_rollup(pid: int) -> dict[str, int]:
    """KiB figures of /proc/PID/smaps_rollup ({} once the process is gone)."""
    out = {}
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        key, _, rest = line.partition(":")
        if key in BACKING_KEYS:
            out[key] = int(rest.split()[0])
    return out


def private_kib(pid: int) -> int | None:
    """Rss - RssShmem of a process, KiB: its own memory, without the shared memory (a
    memfd of guest RAM) it maps. From /proc/PID/status: smaps_rollup has no RssShmem
    line (its Rss includes the guest RAM a process touched). None once it is gone."""
    fields = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssShmem"):
            fields[key] = int(rest.split()[0])
    if "VmRSS" not in fields:
        return None
    return fields["VmRSS"] - fields.get("RssShmem", 0)


class PeakBacking:
    """Polls a process's smaps_rollup while it runs and keeps each figure's peak:
    whether the guest's (or the native program's) memory sat on huge pages."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        for key, kib in smaps_rollup(self.pid).items():
            self.peak_kib[key] = max(kib, self.peak_kib.get(key, 0))

    def __enter__(self) -> PeakBacking:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def huge_mib(self) -> float:
        kib = sum(self.peak_kib.get(k, 0) for k in ("AnonHugePages", "ShmemPmdMapped"))
        return round(kib / 1024, 1)


def backing_summary(huge_mib: Iterable[float], need_mib: float) -> dict[str, object]:
    """Per configuration: the peak huge-page MiB seen in its runs, and whether the
    memory the workloads use (``need_mib``) was on huge pages in every run."""
    values = list(huge_mib)
    return {
        "huge_pages_mib_min": min(values, default=0.0),
        "huge_pages_mib_max": max(values, default=0.0),
        "huge_backed": bool(values) and min(values) >= need_mib,
    }


# ---- command line ----


def add_arguments(parser: argparse.ArgumentParser, plan: Plan) -> None:
    """The harness's options, with the benchmark's own defaults in ``plan``."""
    parser.add_argument("--rounds", type=int, default=plan.min_rounds, help="minimum rounds")
    parser.add_argument("--max-rounds", type=int, default=plan.max_rounds)
    parser.add_argument("--warmup", type=int, default=plan.warmup, help="rounds discarded")
    parser.add_argument(
        "--precision",
        type=float,
        default=plan.precision * 100,
        help="target 95%% CI half-width of every ratio, in percent",
    )
    parser.add_argument("--time-cap", type=float, default=plan.time_cap_s, help="seconds")
    parser.add_argument("--order", choices=("alternate", "random"), default=plan.order)
    parser.add_argument("--seed", type=int, default=plan.seed)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="measured process on the last CPU, load generators on the others",
    )


def plan_from(args: argparse.Namespace, target_metrics: Iterable[str] = ()) -> Plan:
    return Plan(
        target_metrics=tuple(target_metrics),
        min_rounds=args.rounds,
        max_rounds=max(args.max_rounds, args.rounds),
        warmup=args.warmup,
        precision=args.precision / 100,
        time_cap_s=args.time_cap,
        order=args.order,
        seed=args.seed,
    )


def stderr_progress(name: str) -> Callable[[str], None]:
    import sys

    return lambda text: print(f"{name}: {text}", file=sys.stderr, flush=True)


def compare(
    args: argparse.Namespace,
    configs: Mapping[str, Runner],
    baseline: str,
    name: str,
    target_metrics: Iterable[str] = (),
    aa_runner: Callable[[str], Runner] | None = None,
) -> tuple[Rounds, str]:
    """run_rounds of ``configs`` against ``baseline`` with the command line's plan, or
    with --aa that configuration against itself; returns the rounds and the baseline.
    ``aa_runner(side)`` makes each A/A side's runner where a runner records data under
    its configuration's name; without it one runner serves both sides."""
    if args.aa:
        baseline = args.aa
        if aa_runner:
            configs = {side: aa_runner(side) for side in (args.aa, f"{args.aa}'")}
        else:
            configs = aa_configs(configs, args.aa)
    rounds = run_rounds(
        configs, baseline, plan_from(args, target_metrics), progress=stderr_progress(name)
    )
    return rounds, baseline


def ci_text(r: Mapping[str, object], percent: bool = False) -> str:
    """'1.0012 [0.9990, 1.0030]', or as a +/- percentage overhead with percent=True."""
    ratio = float(r["ratio"])  # type: ignore[arg-type]
    ci = r.get("ci95") or [ratio, ratio]
    if percent:
        return f"{(ratio - 1) * 100:+.2f}% [{(ci[0] - 1) * 100:+.2f}, {(ci[1] - 1) * 100:+.2f}]"
    return f"{ratio:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
