"""The benchmark harness's arithmetic (benchmarks/harness.py), without KVM."""

from __future__ import annotations

import importlib.util
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

# By path and under its own name: tests/harness.py (the test helpers) is `harness` here.
_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "harness.py"
_SPEC = importlib.util.spec_from_file_location("benchmarks_harness", _PATH)
harness = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = harness  # dataclasses look their module up there
_SPEC.loader.exec_module(harness)


def test_quantile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert harness.quantile(values, 0.0) == 1.0
    assert harness.quantile(values, 1.0) == 4.0
    assert harness.quantile(values, 0.5) == 2.5
    assert harness.quantile(values, 0.25) == pytest.approx(1.75)
    assert harness.quantile([5.0], 0.9) == 5.0
    with pytest.raises(ValueError):
        harness.quantile([], 0.5)


def test_describe_reports_median_spread_and_iqr():
    d = harness.describe([3.0, 1.0, 2.0, 5.0, 4.0])
    assert d["n"] == 5
    assert (d["median"], d["min"], d["max"]) == (3.0, 1.0, 5.0)
    assert (d["q1"], d["q3"], d["iqr"]) == (2.0, 4.0, 2.0)


def test_bootstrap_ci_of_a_known_distribution_covers_its_median():
    """Normal(100, 1), n = 400: the median's standard error is about
    1.2533 / sqrt(400) = 0.063, so the 95% CI is about ±0.12 around ~100."""
    rng = random.Random(7)
    values = [rng.gauss(100.0, 1.0) for _ in range(400)]
    low, high = harness.bootstrap_ci(values, rng=random.Random(1))
    assert low < 100.0 < high
    assert 0.16 < high - low < 0.35
    # and the interval is not centred by accident: it brackets the sample median
    assert low < statistics.median(values) < high


def test_bootstrap_ci_coverage_is_about_95_percent():
    """Over many samples of a known distribution the CI contains the true median
    close to 95% of the time (percentile bootstrap of a median: 88-99% here)."""
    rng = random.Random(3)
    covered = 0
    trials = 200
    for _ in range(trials):
        values = [rng.expovariate(1.0) for _ in range(41)]
        low, high = harness.bootstrap_ci(values, resamples=400, rng=rng)
        covered += low <= 0.6931 <= high  # median of Exp(1) is ln 2
    assert 0.88 * trials <= covered <= 0.99 * trials


def test_paired_ratio_cancels_drift_between_rounds():
    """A drifts from 100 to 200 over the rounds and B is exactly 2% slower in each
    round: the paired ratio is 1.02 with a CI of zero width."""
    a = [100.0 + 10 * i for i in range(11)]
    b = [x * 1.02 for x in a]
    r = harness.paired_ratio(b, a)
    assert r["ratio"] == pytest.approx(1.02)
    assert r["ci95"] == [pytest.approx(1.02), pytest.approx(1.02)]
    assert r["ci95_half_width_percent"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        harness.paired_ratio([1.0], [1.0, 2.0])


def _noisy(rng: random.Random, noise: float):
    return lambda: {"w": 1000.0 * (1 + rng.gauss(0, noise))}


def test_aa_ratio_is_about_one_and_its_ci_contains_one():
    rng = random.Random(11)
    configs = harness.aa_configs({"x": _noisy(rng, 0.002)}, "x")
    plan = harness.Plan(min_rounds=20, max_rounds=20, warmup=1, precision=0.0)
    rounds = harness.run_rounds(configs, "x", plan)
    r = rounds.to_json()["ratios"]["x'"]["w"]
    assert r["ratio"] == pytest.approx(1.0, abs=0.003)
    assert r["ci95"][0] <= 1.0 <= r["ci95"][1]
    assert rounds.stop_reason == "max_rounds"
    assert len(rounds.samples["x"]["w"]) == len(rounds.samples["x'"]["w"]) == 20


def test_a_real_difference_is_resolved():
    rng = random.Random(5)
    configs = {
        "base": _noisy(rng, 0.002),
        "slow": lambda: {"w": 1010.0 * (1 + rng.gauss(0, 0.002))},
    }
    plan = harness.Plan(min_rounds=10, max_rounds=40, warmup=0, precision=0.005)
    rounds = harness.run_rounds(configs, "base", plan)
    r = rounds.to_json()["ratios"]["slow"]["w"]
    assert r["ci95"][0] > 1.0  # 1% slower, resolved
    assert r["within_precision"]
    assert rounds.stop_reason == "precision_reached"
    assert len(rounds.orders) == 10


def test_alternation_order_and_warmup_are_discarded():
    calls: list[str] = []

    def runner(name: str):
        return lambda: calls.append(name) or {"w": 1.0}

    configs = {n: runner(n) for n in ("a", "b", "c")}
    plan = harness.Plan(min_rounds=4, max_rounds=4, warmup=1, precision=0.0)
    rounds = harness.run_rounds(configs, "a", plan)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc") + list("cba")
    assert rounds.orders == [list("abc"), list("cba"), list("abc"), list("cba")]
    assert len(rounds.samples["a"]["w"]) == 4  # the warm-up round is not a sample


def test_random_order_is_a_permutation_per_round_and_seeded():
    rng1, rng2 = random.Random(9), random.Random(9)
    names = list("abcd")
    first = [harness.round_order(names, i, "random", rng1) for i in range(20)]
    second = [harness.round_order(names, i, "random", rng2) for i in range(20)]
    assert first == second
    assert all(sorted(o) == names for o in first)
    assert len({tuple(o) for o in first}) > 1
    with pytest.raises(ValueError):
        harness.round_order(names, 0, "sideways", rng1)


def test_time_cap_stops_before_a_round_would_overrun():
    """A fake clock: each run takes 10 s, a round of two 20 s, cap 100 s."""
    now = [0.0]

    def runner():
        now[0] += 10.0
        return {"w": 1.0}

    plan = harness.Plan(min_rounds=10, max_rounds=50, warmup=1, precision=0.0, time_cap_s=100)
    rounds = harness.run_rounds({"a": runner, "b": runner}, "a", plan, clock=lambda: now[0])
    # warm-up 20 s, then rounds of 20 s: the fifth would end at 120 s > 100 s
    assert len(rounds.orders) == 4
    assert rounds.stop_reason == "time_cap"
    assert rounds.elapsed_s == 100.0


def test_json_reports_method_configs_and_ratios():
    configs = {"a": lambda: {"w": 2.0}, "b": lambda: {"w": 3.0}}
    plan = harness.Plan(min_rounds=3, max_rounds=3, warmup=0, precision=0.005)
    out = harness.run_rounds(configs, "a", plan).to_json()
    assert out["method"]["rounds"] == 3
    assert out["method"]["baseline"] == "a"
    assert out["configs"]["b"]["w"]["median"] == 3.0
    assert out["ratios"]["b"]["w"]["ratio"] == 1.5
    assert out["ratios"]["b"]["w"]["within_precision"] is True
    assert "a" not in out["ratios"]


def test_backing_summary_and_smaps_of_this_process():
    assert harness.backing_summary([70.0, 80.0], 64)["huge_backed"] is True
    assert harness.backing_summary([70.0, 0.0], 64)["huge_backed"] is False
    assert harness.backing_summary([], 64)["huge_backed"] is False
    own = harness.smaps_rollup(__import__("os").getpid())
    assert own["Rss"] > 0 and "AnonHugePages" in own


def test_private_memory_leaves_out_shared_memory():
    """harness.private_kib (benchmarks/memory.py): 8 MiB of a touched memfd mapping,
    as guest RAM is, count in VmRSS but not in Rss - RssShmem."""
    import mmap
    import os

    pid = os.getpid()
    before = harness.private_kib(pid)
    fd = os.memfd_create("test")
    try:
        os.ftruncate(fd, 8 << 20)
        with mmap.mmap(fd, 8 << 20) as shared:
            for page in range(0, 8 << 20, 4096):
                shared[page] = 1
            after = harness.private_kib(pid)
            assert after - before < 2 << 10  # KiB: well under the 8 MiB touched
    finally:
        os.close(fd)
    assert harness.private_kib(2**22 + 12345) is None  # no such process


def test_machine_state_has_load_thp_and_kernel():
    state = harness.machine_state()
    assert len(state["loadavg"]) == 3
    assert state["thp"]["enabled"] in ("always", "madvise", "never", "")
    assert state["kernel"]
    assert isinstance(state["busy_processes"], list)


def test_median_ci_of_many_samples_covers_the_true_median():
    rng = random.Random(2)
    covered = 0
    for _ in range(200):
        values = [rng.expovariate(1.0) for _ in range(300)]
        low, high = harness.median_ci(values)["median_ci95"]
        covered += low <= 0.6931 <= high
    assert 185 <= covered <= 199  # ~95%
    big = harness.median_ci([rng.gauss(50.0, 5.0) for _ in range(10_000)])
    assert big["median_ci95"][0] < 50.0 < big["median_ci95"][1]
    assert big["median_ci95"][1] - big["median_ci95"][0] < 0.5


def test_only_the_target_metrics_decide_when_to_stop():
    rng = random.Random(4)

    def run():
        return {"steady": 1000.0 * (1 + rng.gauss(0, 0.0005)), "noisy": rng.uniform(1, 3)}

    plan = harness.Plan(
        min_rounds=10, max_rounds=40, warmup=0, precision=0.005, target_metrics=("steady",)
    )
    rounds = harness.run_rounds({"a": run, "b": run}, "a", plan)
    assert rounds.stop_reason == "precision_reached" and len(rounds.orders) == 10
    out = rounds.to_json()
    assert out["ratios"]["b"]["noisy"]["within_precision"] is False
    assert out["method"]["precision_metrics"] == ["steady"]


def test_children_cpu_counts_a_reaped_subprocess():
    before = harness.children_cpu_s()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass",
        ],
        check=True,
    )
    assert harness.children_cpu_s() - before >= 0.19
