"""Whole-process boot time: `pyvmm boot hello.elf` against QEMU microvm on the same
kernel.elf, alternating runs so both see the same machine drift.

    python benchmarks/boot_time.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

from common import KERNELS, pyvmm_command, qemu_microvm_command, report, summary

GREETING = b"hello: Hello from hello.elf, a PVH guest kernel"
CMDLINE = "console=ttyS0"


def timed(command: list[str], expected_status: int, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, env=env
    )
    elapsed = time.perf_counter() - start
    if done.returncode != expected_status or GREETING not in done.stdout:
        raise SystemExit(
            f"{command[0]} failed: status {done.returncode}\n{done.stdout.decode()}"
            f"{done.stderr.decode()}"
        )
    return elapsed * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    kernel = KERNELS / "hello.elf"
    pyvmm = [*pyvmm_command(), "boot", str(kernel), "--cmdline", CMDLINE]
    qemu = qemu_microvm_command(kernel, CMDLINE)
    timed(pyvmm, 0)  # warm the page cache for both before measuring
    timed(qemu, 1)  # QEMU's isa-debug-exit exits with (code << 1) | 1
    # "cold": without the kernel-layout cache, so pyelftools is imported and run.
    cold_env = {**os.environ, "PYVMM_CACHE_DIR": "off"}
    samples: dict[str, list[float]] = {"pyvmm": [], "pyvmm_cold": [], "qemu": []}
    for _ in range(args.runs):
        samples["pyvmm"].append(timed(pyvmm, 0))
        samples["qemu"].append(timed(qemu, 1))
        samples["pyvmm_cold"].append(timed(pyvmm, 0, cold_env))
    stats = {name: summary(values) for name, values in samples.items()}
    ratio = stats["pyvmm"]["median"] / stats["qemu"]["median"]
    cold_ratio = stats["pyvmm_cold"]["median"] / stats["qemu"]["median"]
    result = {
        "benchmark": "boot_time",
        "kernel": str(kernel.relative_to(KERNELS.parent.parent)),
        "runs": args.runs,
        "pyvmm_ms": stats["pyvmm"],
        "pyvmm_cold_ms": stats["pyvmm_cold"],
        "qemu_ms": stats["qemu"],
        "ratio_median": round(ratio, 3),
        "cold_ratio_median": round(cold_ratio, 3),
    }
    report(
        result,
        f"boot_time: pyvmm median {stats['pyvmm']['median']:.1f} ms, QEMU microvm median "
        f"{stats['qemu']['median']:.1f} ms, ratio {ratio:.2f} (target < 1.0); without the "
        f"layout cache {stats['pyvmm_cold']['median']:.1f} ms, ratio {cold_ratio:.2f}",
    )


if __name__ == "__main__":
    main()
