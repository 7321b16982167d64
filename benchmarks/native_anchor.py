"""webkv-native under examples/kvload.py's clients: the anchor that downtime.py holds
pyvmm's stalls against (same webkv sources as a host process, same clients, same
disk place; guest_kernels/README.md, webkv-native)."""

from __future__ import annotations

import sys
import time

import harness
from common import ROOT
from webkv import serving

sys.path.insert(0, str(ROOT / "examples"))
from kvload import KvLoad, Sample, percentile, window_stalls


class NativeRun:
    """Segments of load against webkv-native; each starts a fresh server and disk."""

    def __init__(
        self, workdir: str | None, clients: int, rate: float, pinning: harness.Pinning
    ) -> None:
        self.workdir, self.clients, self.rate, self.pinning = workdir, clients, rate, pinning
        self.segments: list[list[Sample]] = []
        self.failures: list[str] = []
        self.lost = self.acked = 0
        self.seconds = 0.0

    def segment(self, seconds: float) -> None:
        with serving("native", self.workdir) as server:
            port = server.port
            self.pinning.apply_load()  # the client processes inherit this
            load = KvLoad(port, self.clients, rate=self.rate).start()
            self.pinning.apply_measured()
            load.wait_started()
            time.sleep(seconds)
            load.stop()
            self.lost += len(load.lost_writes())
        self.segments.append(load.samples)
        self.failures += load.failures
        self.acked += len(load.acked)
        self.seconds += seconds


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def versus_native(
    native: NativeRun,
    stalls: list[float],
    during: list[float],
    baseline: list[float],
    upgrade_ms: float,
) -> dict[str, object]:
    """pyvmm's figures (per-upgrade longest stalls, latencies during and outside the
    upgrades) against the anchor's over a run of the same length, with the anchor's
    longest request in windows as long as the median upgrade."""
    ms = [s.ms for seg in native.segments for s in seg]
    windows = [w for seg in native.segments for w in window_stalls(seg, upgrade_ms / 1000)]
    figures = {
        "seconds": round(native.seconds, 2),
        "requests": len(ms),
        "p50_ms": round(harness.quantile(ms, 0.5), 3) if ms else 0.0,
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(max(ms, default=0.0), 3),
        "window_ms": round(upgrade_ms, 1),
        "window_stall_ms": harness.describe(windows, 3),
        "failed_requests": len(native.failures),
        "lost_writes": native.lost,
        "acknowledged_writes": native.acked,
    }
    window_median = figures["window_stall_ms"].get("median", 0.0)
    ratios = {
        "median_per_upgrade_stall_over_native_window_median": _ratio(
            harness.quantile(stalls, 0.5), window_median
        ),
        "max_stall_over_native_max": _ratio(max(stalls), figures["max_ms"]),
        "p99_during_upgrades_over_native_p99": _ratio(percentile(during, 0.99), figures["p99_ms"]),
        "baseline_p50_over_native_p50": _ratio(harness.quantile(baseline, 0.5), figures["p50_ms"])
        if baseline
        else None,
        "baseline_p99_over_native_p99": _ratio(percentile(baseline, 0.99), figures["p99_ms"]),
        "baseline_max_over_native_max": _ratio(max(baseline, default=0.0), figures["max_ms"]),
    }
    summary = (
        f"native over {figures['seconds']:.0f} s: p50 {figures['p50_ms']} p99 "
        f"{figures['p99_ms']} max {figures['max_ms']} ms, longest per {upgrade_ms:.0f} ms "
        f"window median {window_median} ms; pyvmm/native: per-upgrade stall "
        f"{ratios['median_per_upgrade_stall_over_native_window_median']}, max "
        f"{ratios['max_stall_over_native_max']}, p99 during upgrades "
        f"{ratios['p99_during_upgrades_over_native_p99']}, baseline p99 "
        f"{ratios['baseline_p99_over_native_p99']}"
    )
    return {"vs_native": {"native": figures, "ratios": ratios, "summary": summary}}
