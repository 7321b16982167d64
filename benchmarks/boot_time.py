"""Whole-process boot time: `pyvmm boot hello.elf` against QEMU microvm on the same
kernel.elf (and pyvmm without its kernel-layout cache), alternated in rounds by
benchmarks/harness.py; ratios to QEMU with bootstrap 95% CIs. ``ms`` is the wall
time, ``cpu_ms`` the CPU time (user + system, all threads) of the process, from the
rusage of the reaped child: what the boot costs, whatever else the machine runs.

    python benchmarks/boot_time.py [--rounds 20] [--precision 1] [--aa pyvmm] [--pin]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import harness
from common import KERNELS, pyvmm_command, qemu_microvm_command, report

GREETING = b"hello: Hello from hello.elf, a PVH guest kernel"
CMDLINE = "console=ttyS0"


def timed(
    command: list[str], expected_status: int, env: dict[str, str] | None = None
) -> dict[str, float]:
    cpu = harness.children_cpu_s()
    start = time.perf_counter()
    done = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, env=env
    )
    elapsed = time.perf_counter() - start
    cpu = harness.children_cpu_s() - cpu
    if done.returncode != expected_status or GREETING not in done.stdout:
        raise SystemExit(
            f"{command[0]} failed: status {done.returncode}\n{done.stdout.decode()}"
            f"{done.stderr.decode()}"
        )
    return {"ms": elapsed * 1000, "cpu_ms": cpu * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--aa", default=None, help="A/A: this configuration against itself")
    harness.add_arguments(
        parser,
        harness.Plan(min_rounds=20, max_rounds=80, warmup=2, precision=0.01, time_cap_s=180),
    )
    args = parser.parse_args()
    conditions = harness.Conditions.pinned(args)
    kernel = KERNELS / "hello.elf"
    pyvmm = [*pyvmm_command(), "boot", str(kernel), "--cmdline", CMDLINE]
    qemu = qemu_microvm_command(kernel, CMDLINE)
    # "cold": without the kernel-layout cache, so pyelftools is imported and run.
    cold_env = {**os.environ, "PYVMM_CACHE_DIR": "off"}
    configs: dict[str, harness.Runner] = {
        "pyvmm": lambda: timed(pyvmm, 0),
        # QEMU's isa-debug-exit exits with (code << 1) | 1
        "qemu": lambda: timed(qemu, 1),
        "pyvmm_cold": lambda: timed(pyvmm, 0, cold_env),
    }
    rounds, baseline = harness.compare(args, configs, "qemu", "boot_time")
    out = rounds.to_json()
    result = {
        "benchmark": "boot_time",
        "kernel": str(kernel.relative_to(KERNELS.parent.parent)),
        **out,
        **conditions.to_json(),
    }
    medians = ", ".join(
        f"{name} median {per['ms']['median']:.1f} ms (IQR {per['ms']['iqr']:.1f}, "
        f"CPU {per['cpu_ms']['median']:.1f} ms)"
        for name, per in out["configs"].items()
    )
    ratios = ", ".join(
        f"{name}/{baseline} {harness.ci_text(per['ms'])} (CPU {harness.ci_text(per['cpu_ms'])})"
        for name, per in out["ratios"].items()
    )
    report(
        result,
        f"boot_time: {out['method']['rounds']} rounds; {medians}; {ratios} (target < 1.0)",
    )


if __name__ == "__main__":
    main()
