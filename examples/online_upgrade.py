"""Upgrade a live webkv server from v1 to v2 on one node while clients use it.

    .venv/bin/python examples/online_upgrade.py [--json] [--clients 8] [--png timeline.png]

Boots webkv-v1 with a disk and a forwarded port under an armed pyvmm node, drives
load with real concurrent HTTP clients, upgrades to v2 with `pyvmm upgrade`, then
kills the node (SIGKILL) and checks every acknowledged write on the disk image with
the guest's own recovery rules (guest_kernels/tools/webkv_disk.py): each key's latest
value, deleted keys absent. Prints the client-side report: the longest stall, failed
requests (must be 0), lost writes on disk (must be 0) of those checked, and latency
per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvload import KvLoad, longest_stall_ms, summarize

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "guest_kernels" / "build"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pyvmm(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvmm", *args]


class Node:
    """An armed pyvmm node running webkv-v1, for the life of a `with` block."""

    def __init__(
        self, workdir: str, disk: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        """A blank 64 MiB disk in ``workdir``, or ``disk`` as it is (a node booted on
        the image another one left); ``env``: more environment for the node."""
        self.control = f"{workdir}/node.sock"
        self.port = free_port()
        if disk is None:
            disk = Path(workdir) / "kv.img"
            with open(disk, "wb") as f:
                f.truncate(64 << 20)
        self.disk = disk
        self.log = open(Path(workdir) / "console.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            pyvmm(
                "boot",
                str(KERNELS / "webkv-v1.elf"),
                "--disk",
                str(disk),
                "--forward",
                f"127.0.0.1:{self.port}=80",
                "--control",
                self.control,
            ),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"GET /status HTTP/1.1\r\nHost: n\r\n\r\n")
                    if s.recv(12).startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit("webkv did not come up")

    def request_upgrade(self, kernel: str, *extra: str) -> dict:
        """Runs `pyvmm upgrade --json` to ``kernel`` (in guest_kernels/build); its reply."""
        done = subprocess.run(
            pyvmm("upgrade", self.control, "--to", str(KERNELS / kernel), "--json", *extra),
            capture_output=True,
            text=True,
            timeout=300,
        )
        return json.loads(done.stdout.splitlines()[-1])

    def upgrade(self, kernel: str, *extra: str) -> tuple[dict, list[dict]]:
        """Runs `pyvmm upgrade --json`; returns its report and the phase timeline."""
        reply = self.request_upgrade(kernel, *extra)
        if not reply.get("ok"):
            raise SystemExit(f"upgrade request failed: {reply.get('error')}")
        report = reply["result"]
        # The node reports on the host's monotonic clock, the one our samples use.
        timeline = []
        for phase in report["phases"]:
            start = report["monotonic_start"] + phase["start"]
            timeline.append({**phase, "start": start, "end": start + phase["seconds"]})
        return report, timeline

    def kill(self) -> None:
        """SIGKILL: the node gets no chance to tidy up; what its disk image holds now
        is what the next boot recovers."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.log.close()


def per_phase(samples, timeline: list[dict]) -> dict[str, dict]:
    phases = {
        "before": [s for s in samples if s.end < timeline[0]["start"]],
        "after": [s for s in samples if s.start > timeline[-1]["end"]],
    }
    for phase in timeline:
        phases[phase["phase"]] = [
            s for s in samples if s.end >= phase["start"] and s.start <= phase["end"]
        ]
    return {name: summarize(group) for name, group in phases.items()}


def plot(samples, timeline: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no PNG", file=sys.stderr)
        return
    t0 = min(s.start for s in samples)
    fig, ax = plt.subplots(figsize=(10, 4.4))
    ax.scatter([s.start - t0 for s in samples], [s.ms for s in samples], s=2)
    span = max(s.end for s in samples) - t0
    top = max(s.ms for s in samples)
    for i, phase in enumerate(timeline):
        ax.axvspan(phase["start"] - t0, phase["end"] - t0, alpha=0.12 + 0.08 * (i % 2))
        if phase["end"] - phase["start"] > span / 50:  # short phases are named below
            ax.text(phase["start"] - t0, top * 0.95, phase["phase"], fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("request latency (ms)")
    ax.set_title("webkv v1 → v2 online upgrade (shaded: upgrade phases)")
    names = "  ".join(f"{p['phase']} {p['seconds'] * 1000:.1f} ms" for p in timeline)
    ax.text(0, -0.22, names, transform=ax.transAxes, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(kernel: str, extra: tuple[str, ...], clients: int, settle: float) -> dict:
    with tempfile.TemporaryDirectory() as workdir, Node(workdir) as node:
        load = KvLoad(node.port, clients).start()
        time.sleep(settle)
        report, timeline = node.upgrade(kernel, *extra)
        time.sleep(settle)
        load.stop()
        lost_live = load.lost_writes()
        node.kill()
        lost = load.lost_on_disk(str(node.disk))
    start, end = timeline[0]["start"], timeline[-1]["end"]
    during = [s for s in load.samples if s.end >= start and s.start <= end]
    outside = [s for s in load.samples if s.end < start or s.start > end]
    return {
        "upgrade": report,
        "failed_requests": len(load.failures),
        "failures": load.failures[:10],
        "lost_writes": len(lost),  # on the disk, after SIGKILL
        "lost_keys": lost[:10],
        "writes_checked": load.writes,
        "lost_writes_live": len(lost_live),  # asked of the service before the kill
        "acknowledged_writes": len(load.acked),
        "reconnects": load.reconnects,
        # The upgrade's own effect: requests that overlapped it. Outside it, the same
        # load shows what the node does anyway (a fresh service's first requests too).
        "max_stall_ms": round(longest_stall_ms(during), 3),
        "max_stall_outside_upgrade_ms": round(longest_stall_ms(outside), 3),
        "p99_ms": summarize(load.samples)["p99_ms"],
        "phases": per_phase(load.samples, timeline),
        "_samples": load.samples,
        "_timeline": timeline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--png", help="write a latency timeline with the phases marked")
    args = parser.parse_args()
    result = run("webkv-v2.elf", (), args.clients, settle=2.0)
    if args.png:
        plot(result["_samples"], result["_timeline"], args.png)
    report = {k: v for k, v in result.items() if not k.startswith("_")}
    if args.json:
        print(json.dumps(report))
    else:
        up = report["upgrade"]
        print(
            f"upgrade {up['before']} -> {up['after']}: {'ok' if up['ok'] else 'ROLLED BACK'} "
            f"in {up['total_s'] * 1000:.0f} ms"
        )
        print(
            f"failed requests: {report['failed_requests']}   lost writes: "
            f"{report['lost_writes']} of {report['writes_checked']} checked on disk   "
            f"longest stall: {report['max_stall_ms']:.1f} ms during the upgrade "
            f"({report['max_stall_outside_upgrade_ms']:.1f} ms outside it)   "
            f"p99: {report['p99_ms']:.2f} ms"
        )
        for name, stats in report["phases"].items():
            print(
                f"  {name:<13} {stats['requests']:6d} requests  p50 {stats['p50_ms']:7.2f} ms"
                f"  p99 {stats['p99_ms']:7.2f} ms  max {stats['max_ms']:7.2f} ms"
            )
    clean = report["failed_requests"] == 0 and report["lost_writes"] == 0
    sys.exit(0 if clean and report["upgrade"]["ok"] else 1)


if __name__ == "__main__":
    main()
