"""Whole-process time of `pyvmm ctl NODE status` and `pyvmm upgrade` against an idle
armed node, next to the same commands through the typer app (what every call cost
before the fast path) and a bare Python start, in alternated rounds
(benchmarks/harness.py) so all see the same machine drift; ratios to the typer path.
The goal: ≤100 ms, as a fleet tool calls these once per node.

    python benchmarks/ctl_start.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from common import KERNELS, pyvmm_command, report

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
    harness.add_arguments(
        parser, harness.Plan(min_rounds=20, max_rounds=40, warmup=2, precision=0.02)
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        node, control = start_node(workdir)
        try:
            status = ["ctl", control, "status", "--json"]
            # This node has no disk to hand over: the upgrade fails its preflight at
            # once (exit 3), after the same start-up and round trip a real one has.
            upgrade = ["upgrade", control, "--to", str(KERNELS / "hello.elf"), "--json"]
            commands = {
                "ctl_status_typer": ([*TYPER, *status], 0),
                "ctl_status": ([*pyvmm_command(), *status], 0),
                "upgrade_typer": ([*TYPER, *upgrade], 3),
                "upgrade": ([*pyvmm_command(), *upgrade], 3),
                "python": ([sys.executable, "-c", "pass"], 0),
            }
            configs = {
                name: (lambda c=command, e=expected: {"ms": timed(c, e)})
                for name, (command, expected) in commands.items()
            }
            rounds = harness.run_rounds(
                configs,
                "ctl_status_typer",
                harness.plan_from(args),
                progress=harness.stderr_progress("ctl_start"),
            )
        finally:
            node.kill()
            node.wait()
    out = rounds.to_json()
    median = {name: per["ms"]["median"] for name, per in out["configs"].items()}
    result = {"benchmark": "ctl_start", "machine": harness.machine_state(), **out}
    report(
        result,
        f"ctl_start: {out['method']['rounds']} rounds; pyvmm ctl status median "
        f"{median['ctl_status']:.1f} ms, pyvmm upgrade {median['upgrade']:.1f} ms (goal "
        f"≤100 ms); through typer {median['ctl_status_typer']:.1f} / "
        f"{median['upgrade_typer']:.1f} ms (ctl/typer "
        f"{harness.ci_text(out['ratios']['ctl_status']['ms'])}); bare python "
        f"{median['python']:.1f} ms",
    )


if __name__ == "__main__":
    main()
