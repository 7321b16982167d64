"""The noise check end to end, short: benchmarks/overhead.py in A/A mode (pyvmm against
itself) for three rounds of one small workload, and its arithmetic re-done here from
the raw samples in its JSON. Full A/A runs are benchmarks, not tests."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_short_aa_run_of_overhead_is_consistent(kernels):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "overhead.py"),
            "--aa",
            "pyvmm",
            "--run",
            "alu",
            "--args",
            "n_alu=100000000",
            "--native-hugepages",
            "off",
            "--rounds",
            "3",
            "--max-rounds",
            "3",
            "--warmup",
            "1",
        ],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    method = out["method"]
    assert method["rounds"] == 3 and method["warmup_runs_discarded"] == 1
    assert method["stop_reason"] == "max_rounds"
    assert out["results_identical"]
    a = out["configs"]["pyvmm"]["alu"]["samples"]
    b = out["configs"]["pyvmm'"]["alu"]["samples"]
    assert len(a) == len(b) == 3
    assert out["configs"]["pyvmm"]["alu"]["median"] == pytest.approx(statistics.median(a))
    ratio = out["ratios"]["pyvmm'"]["alu"]
    per_round = [y / x for x, y in zip(a, b, strict=True)]
    assert ratio["ratio"] == pytest.approx(statistics.median(per_round), abs=1e-6)
    low, high = ratio["ci95"]
    assert min(per_round) - 1e-6 <= low <= ratio["ratio"] <= high <= max(per_round) + 1e-6
    # pyvmm runs in the benchmark's process: the vCPU thread's CPU share was read
    on_cpu = out["configs"]["pyvmm"]["alu_cpu"]["samples"]
    assert all(0 < c <= w for c, w in zip(on_cpu, a, strict=True))
    # the same program against itself: far from any real difference even in 3 short
    # runs, when measured in on-CPU cycles (wall time here depends on the other users)
    assert 0.75 < out["ratios"]["pyvmm'"]["alu_cpu"]["ratio"] < 1.33
    assert out["pinning"]["pinned"] is False
    assert out["machine_before"]["kernel"] and "thp" in out["machine_after"]
    assert done.stderr.strip().splitlines()[-1].startswith("overhead: 3 rounds")
