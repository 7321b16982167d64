"""How long a shared back-end process takes to start and to be replaced, and what it
costs in memory: the figures behind "no pre-started spare process" (docs/decisions.md).

One disk back-end process (``BlkProcess``) serves ``--fronts`` front-ends (one per
partition, each on a memfd of guest RAM as the node's are). Each round measures:

- ``start_s``: the process started, connected, every front-end added and set up;
- ``restart_s``: SIGKILL to the replacement serving every front-end again, the lease
  re-sent (``restarts`` going up means restored): how long a disk is unusable;
- ``child_start_s``: a bare process started and connected (what a pre-started spare
  process would save of ``restart_s``);
- ``backend_mib``: the process's Rss - RssShmem (/proc/PID/status) after a restart,
  what a spare would cost.

    python benchmarks/backend_restart.py [--fronts 2] [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time

import harness
from common import report

from pyvmm.backends.blk_front import BlkProcess, ProcessBlk
from pyvmm.backends.process import Child
from pyvmm.memory import MEMFD_4K, GuestMemory, MiB

PARTITION = 16 * MiB


def wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.001)


def one_round(disk: str, fronts: int) -> dict[str, float]:
    memory = GuestMemory(fronts * PARTITION, backing=MEMFD_4K)
    start = time.monotonic()
    process = BlkProcess(disk)
    devices = [
        ProcessBlk(process, memory, (i * PARTITION, PARTITION), f"blk{i}", i) for i in range(fronts)
    ]
    process.grant(devices[0])
    start_s = time.monotonic() - start
    try:
        pid = process.pid
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait(lambda: process.restarts == 1)
        restart_s = time.monotonic() - killed
        backend_mib = (harness.private_kib(process.pid) or 0) / 1024
        started = time.monotonic()
        Child("pyvmm.backends.blk", ["--disk", disk], "spare", lambda *_: None).close()
        child_start_s = time.monotonic() - started
    finally:
        for device in devices:
            device.close()
        memory.close()
    return {
        "start_s": start_s,
        "restart_s": restart_s,
        "child_start_s": child_start_s,
        "backend_mib": backend_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fronts", type=int, default=2, help="front-ends (partitions)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    machine_before = harness.machine_state()
    with tempfile.NamedTemporaryFile(dir="/dev/shm", suffix=".img") as disk:
        disk.truncate(8 * MiB)
        rounds = [one_round(disk.name, args.fronts) for _ in range(args.rounds)]
    metrics = {k: harness.describe([r[k] for r in rounds]) for k in rounds[0]}
    result = {
        "benchmark": "backend_restart",
        "fronts": args.fronts,
        "rounds": args.rounds,
        **metrics,
        "machine_before": machine_before,
        "machine_after": harness.machine_state(),
    }
    med = {k: v["median"] for k, v in metrics.items()}
    report(
        result,
        f"backend_restart ({args.fronts} front-ends, {args.rounds} rounds, medians): start "
        f"{med['start_s'] * 1000:.0f} ms, kill to restored {med['restart_s'] * 1000:.0f} ms "
        f"(a bare process starts in {med['child_start_s'] * 1000:.0f} ms), back-end "
        f"{med['backend_mib']:.1f} MiB Rss-RssShmem; load {machine_before.get('loadavg')}",
    )


if __name__ == "__main__":
    main()
