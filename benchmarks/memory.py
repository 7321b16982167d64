"""The VMM's own memory (DESIGN.md §8: ≤30 MiB for the VMM, ≤60 MiB with its back-end
processes): Σ(Rss - RssShmem) over the `pyvmm boot` process and every process it
started (its device back-ends, found as its descendants, whatever they are called).
Guest RAM is a memfd, shared memory that each of them maps, so RssShmem takes it out
and what remains is each process's own memory: interpreter, libraries, modules, heap,
stacks (``harness.private_kib``: from /proc/PID/status, as smaps_rollup has no
RssShmem).

webkv-v1 is booted as webkv.py boots it (a disk, a forwarded port), with
``--device-backends thread`` and ``process`` alternated by the harness; each run
samples once idle (``--settle`` seconds after webkv answers), polls during
examples/kvload.py's clients (``--load-seconds``, the peak) and once after them.
``--armed`` adds a control socket: the node as it runs ready for an upgrade (two
partitions, the microvisor, the control server).

    python benchmarks/memory.py [--backends thread,process] [--rounds 3] [--load-seconds 5]
        [--armed]
"""

from __future__ import annotations

import argparse
import threading
import time

import harness
from common import report
from webkv import kvload, serving

MIB = 1024
GOAL_VMM_MIB = 30
GOAL_TOTAL_MIB = 60


def command_of(pid: int) -> str:
    """The process's command line, shortened to what tells processes apart."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if len(argv) > 2 and argv[1] == "-m":  # python -m pyvmm.backends.blk ...
        return argv[2]
    return " ".join(a.rsplit("/", 1)[-1] for a in argv[:2])


class Sampler:
    """Private KiB of a VMM and its descendants: samples on demand, and the peak of
    each process over a polling period."""

    def __init__(self, vmm: int) -> None:
        self.vmm = vmm
        self.commands: dict[int, str] = {}

    def sample(self) -> dict[int, int]:
        out = {}
        for pid in harness.process_tree(self.vmm):
            kib = harness.private_kib(pid)
            if kib is not None:
                out[pid] = kib
                if pid not in self.commands:
                    self.commands[pid] = command_of(pid)
        return out

    def peak_while(self, work, interval_s: float = 0.25) -> dict[int, int]:
        """Runs ``work()`` while polling; each process's largest sample."""
        peak: dict[int, int] = {}
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                for pid, kib in self.sample().items():
                    peak[pid] = max(kib, peak.get(pid, 0))
                done.wait(interval_s)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            work()
        finally:
            done.set()
            poller.join()
        return peak


def split_mib(vmm: int, per_pid: dict[int, int]) -> tuple[float, float, int]:
    """(VMM MiB, back-ends' MiB, number of back-end processes) of one sample."""
    backends = {pid: kib for pid, kib in per_pid.items() if pid != vmm}
    return (
        round(per_pid.get(vmm, 0) / MIB, 2),
        round(sum(backends.values()) / MIB, 2),
        len(backends),
    )


def run(backends: str, settle_s: float, load_s: float, disk_dir: str, armed: bool) -> dict:
    server = "pyvmm-process" if backends == "process" else "pyvmm"
    with serving(server, disk_dir, settle_s + load_s + 120, armed) as node:
        sampler = Sampler(node.process.pid)
        time.sleep(settle_s)
        idle = sampler.sample()
        load: dict = {}
        peak = sampler.peak_while(lambda: load.update(kvload(node.port, load_s, 0.2)))
        time.sleep(settle_s)
        after = sampler.sample()
        if node.process.poll() is not None:
            raise SystemExit(f"pyvmm ({backends}) exited with {node.process.returncode}")
        processes = [
            {
                "pid": pid,
                "role": "vmm" if pid == node.process.pid else "backend",
                "command": sampler.commands.get(pid, "?"),
                **{
                    f"{when}_mib": round(sample[pid] / MIB, 2)
                    for when, sample in (("idle", idle), ("peak", peak), ("after_load", after))
                    if pid in sample
                },
            }
            for pid in sorted(set(idle) | set(peak) | set(after))
        ]
    return {
        "samples": {"idle": idle, "peak": peak, "after_load": after},
        "vmm": node.process.pid,
        "processes": processes,
        "requests": load.get("requests", 0),
        "failures": load.get("failures", 0),
    }


def metrics(result: dict) -> dict[str, float]:
    """The VMM's and the whole set's MiB at each sample (the back-ends' share is the
    difference; it is 0 with threads, so it has no ratio to the baseline)."""
    out: dict[str, float] = {}
    for when, per_pid in result["samples"].items():
        vmm, backends, _ = split_mib(result["vmm"], per_pid)
        out[f"vmm_{when}_mib"] = vmm
        out[f"total_{when}_mib"] = round(vmm + backends, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", default="thread,process", help="--device-backends values")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before a sample")
    parser.add_argument("--load-seconds", type=float, default=5.0, help="kvload's run")
    parser.add_argument("--disk-dir", default="/dev/shm", help="where the disk image goes")
    parser.add_argument(
        "--armed", action="store_true", help="with --control: two partitions, the microvisor"
    )
    parser.add_argument("--aa", default=None, help="A/A: this configuration against itself")
    harness.add_arguments(parser, harness.Plan(min_rounds=3, max_rounds=3, warmup=0))
    args = parser.parse_args()
    conditions = harness.Conditions.pinned(args)
    names = args.backends.split(",")
    last: dict[str, dict] = {}

    def runner(name: str):
        def once() -> dict[str, float]:
            result = run(name, args.settle, args.load_seconds, args.disk_dir, args.armed)
            if result["failures"]:
                raise SystemExit(f"{name}: {result['failures']} kvload requests failed")
            last[name] = result
            return metrics(result)

        return once

    rounds, _ = harness.compare(args, {n: runner(n) for n in names}, names[0], "memory")
    out = rounds.to_json()
    result = {
        "benchmark": "memory",
        "what": "sum of Rss - RssShmem (/proc/PID/status) over the VMM and its back-end processes",
        "goal_mib": {"vmm": GOAL_VMM_MIB, "vmm_and_backends": GOAL_TOTAL_MIB},
        "armed": args.armed,
        "settle_s": args.settle,
        "load_seconds": args.load_seconds,
        **out,
        "processes_last_round": {name: r["processes"] for name, r in last.items()},
        "kvload_requests_last_round": {name: r["requests"] for name, r in last.items()},
        **conditions.to_json(),
    }
    parts = []
    for name, m in out["configs"].items():
        med = {k: v["median"] for k, v in m.items()}
        backends = sum(p["role"] == "backend" for p in last[name]["processes"])
        parts.append(
            f"{name}: VMM {med['vmm_idle_mib']:.1f} idle / {med['vmm_after_load_mib']:.1f} "
            f"after load / {med['vmm_peak_mib']:.1f} peak MiB"
            + (
                f", with {backends} back-end process(es) {med['total_idle_mib']:.1f} / "
                f"{med['total_after_load_mib']:.1f} / {med['total_peak_mib']:.1f} MiB"
                if backends
                else ""
            )
        )
    report(
        result,
        f"memory ({out['method']['rounds']} rounds{', armed' if args.armed else ''}, "
        f"Rss - RssShmem, goal VMM <= {GOAL_VMM_MIB}, "
        f"with back-ends <= {GOAL_TOTAL_MIB} MiB): " + "; ".join(parts),
    )


if __name__ == "__main__":
    main()
