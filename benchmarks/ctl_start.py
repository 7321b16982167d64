"""Whole-process time of `pyvmm ctl NODE status` and `pyvmm upgrade` against an idle
armed node, next to the same commands through the typer app (what every call cost
before the fast path) and a bare Python start, alternating runs so all see the same
machine drift. The goal: ≤100 ms, as a fleet tool calls these once per node.

    python benchmarks/ctl_start.py [--runs 20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import KERNELS, pyvmm_command, report, summary

TYPER = [sys.executable, "-c", "from pyvmm.cli import app; app(prog_name='pyvmm')"]


def timed(command: list[str], expected_status: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    elapsed = time.perf_counter() - start
    if done.returncode != expected_status:
        raise SystemExit(
            f"{' '.join(command)}: status {done.returncode}\n{done.stdout.decode()}"
            f"{done.stderr.decode()}"
        )
    return elapsed * 1000


def start_node(workdir: str) -> tuple[subprocess.Popen, str]:
    """An armed node whose guest halts: it answers the control socket and does nothing
    else, so the timings are the client's."""
    control = f"{workdir}/node.sock"
    node = subprocess.Popen(
        [
            *pyvmm_command(),
            "boot",
            str(KERNELS / "probe.elf"),
            "--cmdline",
            "console=ttyS0 probe=halt",
            "--control",
            control,
            "--timeout",
            "600",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not Path(control).exists():
        if time.monotonic() > deadline or node.poll() is not None:
            node.kill()
            raise SystemExit("the node did not come up")
        time.sleep(0.05)
    return node, control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        node, control = start_node(workdir)
        try:
            status = ["ctl", control, "status", "--json"]
            # This node has no disk to hand over: the upgrade fails its preflight at
            # once (exit 3), after the same start-up and round trip a real one has.
            upgrade = ["upgrade", control, "--to", str(KERNELS / "hello.elf"), "--json"]
            commands = {
                "python": ([sys.executable, "-c", "pass"], 0),
                "ctl_status": ([*pyvmm_command(), *status], 0),
                "upgrade": ([*pyvmm_command(), *upgrade], 3),
                "ctl_status_typer": ([*TYPER, *status], 0),
                "upgrade_typer": ([*TYPER, *upgrade], 3),
            }
            for command, expected in commands.values():
                timed(command, expected)  # warm the page cache
            samples: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, (command, expected) in commands.items():
                    samples[name].append(timed(command, expected))
        finally:
            node.kill()
            node.wait()
    stats = {name: summary(values) for name, values in samples.items()}
    median = {name: s["median"] for name, s in stats.items()}
    result = {
        "benchmark": "ctl_start",
        "runs": args.runs,
        **{f"{name}_ms": s for name, s in stats.items()},
        "ctl_vs_typer": round(median["ctl_status"] / median["ctl_status_typer"], 3),
        "upgrade_vs_typer": round(median["upgrade"] / median["upgrade_typer"], 3),
    }
    report(
        result,
        f"ctl_start: pyvmm ctl status median {median['ctl_status']:.1f} ms, pyvmm upgrade "
        f"{median['upgrade']:.1f} ms (goal ≤100 ms); through typer "
        f"{median['ctl_status_typer']:.1f} / {median['upgrade_typer']:.1f} ms; bare python "
        f"{median['python']:.1f} ms",
    )


if __name__ == "__main__":
    main()
