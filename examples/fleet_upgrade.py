"""Upgrade a fleet of live webkv nodes online through Ansible, all at once or rolling.

    .venv/bin/python examples/fleet_upgrade.py [--nodes N] [--rolling | --all-at-once]
                                               [--inject FAULT] [--json] [--png FILE]
    .venv/bin/python examples/fleet_upgrade.py --serve [--nodes N]

Starts N webkv-v1 nodes on this machine (each its own `pyvmm boot --control`, disk and
forwarded port, as examples/online_upgrade.py does), drives a light, rate-limited load
on every node with examples/kvload.py, and runs examples/fleet/upgrade.yml (a canary,
then all the rest; --all-at-once: one batch; --rolling: rolling.yml, one node at a
time) with ansible-playbook against them. Then checks every node: failed requests,
lost writes (on its disk, once killed), longest stall, the version now serving, and
prints the fleet report. --inject makes the last node's upgrade fail (it rolls back);
the other nodes go on as the play's failure policy says. --serve only starts the
nodes, at the sockets examples/fleet/inventory.yml names, and keeps them until Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import yaml
from kvload import KvLoad, longest_stall_ms, summarize
from online_upgrade import Node

ROOT = Path(__file__).resolve().parent.parent
FLEET = ROOT / "examples" / "fleet"
# Ansible refuses to run without a UTF-8 locale.
ANSIBLE_ENV = {**os.environ, "LC_ALL": "C.UTF-8", "ANSIBLE_NOCOLOR": "1"}


def ansible_playbook() -> str:
    """The ansible-playbook beside this interpreter (the [fleet] extra), else on PATH."""
    beside = Path(sys.executable).parent / "ansible-playbook"
    return str(beside) if beside.exists() else "ansible-playbook"


def write_inventory(workdir: Path, hosts: list[str], inject: str | None) -> Path:
    """examples/fleet/inventory.yml for the first len(hosts) nodes, with this run's
    sockets; ``inject`` goes on the last node only."""
    inventory = yaml.safe_load((FLEET / "inventory.yml").read_text())
    group = inventory["all"]["children"]["pyvmm_nodes"]
    known = list(group["hosts"])
    if len(hosts) > len(known):
        raise SystemExit(f"examples/fleet/inventory.yml names only {len(known)} nodes")
    group["hosts"] = {host: {} for host in hosts}
    group["vars"]["pyvmm_fleet_dir"] = str(workdir)
    group["vars"]["pyvmm_kernel"] = str(ROOT / "guest_kernels" / "build" / "webkv-v2.elf")
    if inject:
        group["hosts"][hosts[-1]] = {"pyvmm_inject": inject}
    path = workdir / "inventory.yml"
    path.write_text(yaml.safe_dump(inventory))
    return path


# How the nodes are batched: upgrade.yml's canary then all the rest, everything in one
# batch (the same play with serial 100%), or rolling.yml's one node at a time.
MODES = ("canary", "parallel", "rolling")


def run_playbook(inventory: Path, workdir: Path, mode: str, forks: int) -> dict:
    """Runs the play; returns its wall time, exit status, output and the fleet report."""
    report = workdir / "report.json"
    playbook = FLEET / ("rolling.yml" if mode == "rolling" else "upgrade.yml")
    command = [
        ansible_playbook(),
        "-i",
        str(inventory),
        str(playbook),
        "--forks",
        str(forks),
        "-e",
        f"pyvmm_report={report}",
    ]
    if mode == "parallel":
        command += ["-e", "pyvmm_serial=100%"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=ANSIBLE_ENV, timeout=600)
    ended = time.monotonic()
    if not report.exists():
        # A failure stopped the playbook before its report play: run that play alone.
        subprocess.run(
            [*command[:3], str(FLEET / "report.yml"), *command[4:8]],
            capture_output=True,
            env=ANSIBLE_ENV,
            timeout=120,
        )
    fleet = json.loads(report.read_text()) if report.exists() else None
    return {
        "status": done.returncode,
        "started": started,
        "ended": ended,
        "output": done.stdout + done.stderr,
        "fleet": fleet,
    }


def node_checks(node: Node, load: KvLoad, upgrade: dict) -> dict:
    """What the clients saw on one node, what it serves now, and what its disk holds
    once it is killed (SIGKILL: what a fresh boot would recover)."""
    lost_live = load.lost_writes()
    status = json.loads(node_get(node, "/status"))
    node.kill()
    lost = load.lost_on_disk(str(node.disk))
    window = (upgrade.get("monotonic_start"), upgrade.get("monotonic_end"))
    if window[0] is not None:
        during = [s for s in load.samples if s.end >= window[0] and s.start <= window[1]]
        outside = [s for s in load.samples if s.end < window[0] or s.start > window[1]]
    else:
        during, outside = [], load.samples
    return {
        "outcome": upgrade.get("outcome", "not_run"),
        "version": status.get("version"),
        "upgrade_ms": None if window[0] is None else round(upgrade["total_s"] * 1000, 1),
        "failed_requests": len(load.failures),
        "failures": load.failures[:5],
        "lost_writes": len(lost),  # on the disk, after SIGKILL
        "lost_writes_live": len(lost_live),  # asked of the service before the kill
        "acknowledged_writes": len(load.acked),
        "requests": len(load.samples),
        "max_stall_ms": round(longest_stall_ms(during), 3),
        "max_stall_outside_upgrade_ms": round(longest_stall_ms(outside), 3),
        "p99_ms": summarize(load.samples)["p99_ms"],
        "window": window,
        "failed_phase": upgrade.get("failed_phase"),
        "reason": upgrade.get("reason"),
    }


def node_get(node: Node, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def run(
    nodes: int,
    mode: str = "canary",
    inject: str | None = None,
    clients: int = 2,
    rate: float = 40.0,
    settle: float = 1.0,
) -> dict:
    """One fleet upgrade under load; the report (with the samples under ``_samples``)."""
    hosts = [f"node{i}" for i in range(1, nodes + 1)]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        fleet_nodes = {}
        for host in hosts:
            (workdir / host).mkdir()
            fleet_nodes[host] = stack.enter_context(Node(str(workdir / host)))
        loads = {h: KvLoad(n.port, clients, rate=rate).start() for h, n in fleet_nodes.items()}
        time.sleep(settle)
        inventory = write_inventory(workdir, hosts, inject)
        play = run_playbook(inventory, workdir, mode, forks=max(nodes, 5))
        time.sleep(settle)
        for load in loads.values():
            load.stop()
        fleet = play["fleet"] or {"nodes": {}, "fleet": {}, "lines": []}
        checks = {
            h: node_checks(n, loads[h], fleet["nodes"].get(h, {})) for h, n in fleet_nodes.items()
        }
    starts = [c["window"][0] for c in checks.values() if c["window"][0] is not None]
    ends = [c["window"][1] for c in checks.values() if c["window"][1] is not None]
    timing = {
        "wall_s": round(play["ended"] - play["started"], 3),
        "span_s": round(max(ends) - min(starts), 4) if starts else None,
        # Ansible's own start-up (and its tasks before the first upgrade starts), and
        # what follows the last upgrade's end (its report plays, its exit).
        "ansible_before_s": round(min(starts) - play["started"], 3) if starts else None,
        "ansible_after_s": round(play["ended"] - max(ends), 3) if ends else None,
    }
    return {
        "nodes": nodes,
        "mode": mode,
        "inject": inject,
        "playbook_status": play["status"],
        **timing,
        "fleet": fleet["fleet"],
        "lines": fleet["lines"],
        "per_node": {h: {k: v for k, v in c.items() if k != "window"} for h, c in checks.items()},
        "_samples": {h: loads[h].samples for h in hosts},
        "_windows": {h: c["window"] for h, c in checks.items()},
        "_output": play["output"],
    }


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no PNG", file=sys.stderr)
        return
    samples, windows = result["_samples"], result["_windows"]
    t0 = min(s.start for group in samples.values() for s in group)
    fig, axes = plt.subplots(len(samples), 1, figsize=(10, 1.6 + 1.4 * len(samples)), sharex=True)
    axes = axes if len(samples) > 1 else [axes]
    for ax, (host, group) in zip(axes, samples.items(), strict=True):
        ax.scatter([s.start - t0 for s in group], [s.ms for s in group], s=2)
        start, end = windows[host]
        if start is not None:
            ax.axvspan(start - t0, end - t0, color="tab:orange", alpha=0.3)
        node = result["per_node"][host]
        ax.set_ylabel(f"{host}\nms")
        ax.set_title(
            f"{host}: {node['outcome']}, now {node['version']}, longest stall "
            f"{node['max_stall_ms']:.1f} ms",
            fontsize=8,
        )
    axes[-1].set_xlabel("seconds (shaded: the node's upgrade)")
    fig.suptitle(f"{result['nodes']} nodes, {result['mode']}: request latency per node")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def serve(nodes: int) -> None:
    """Starts node1..nodeN at examples/fleet/inventory.yml's sockets; waits for Ctrl-C."""
    inventory = yaml.safe_load((FLEET / "inventory.yml").read_text())
    base = Path(inventory["all"]["children"]["pyvmm_nodes"]["vars"]["pyvmm_fleet_dir"])
    with ExitStack() as stack:
        for i in range(1, nodes + 1):
            workdir = base / f"node{i}"
            workdir.mkdir(parents=True, exist_ok=True)
            node = stack.enter_context(Node(str(workdir)))
            print(f"node{i}: {node.control}, webkv on 127.0.0.1:{node.port}", flush=True)
        print("serving; Ctrl-C (or SIGTERM) stops the nodes", flush=True)
        # Either signal ends the `with`, which stops every node (a shell may have
        # started this in the background with SIGINT ignored).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    batches = parser.add_mutually_exclusive_group()
    batches.add_argument("--rolling", action="store_true", help="serial: 1 (rolling.yml)")
    batches.add_argument(
        "--all-at-once", action="store_true", help="no canary: every node in one batch"
    )
    parser.add_argument("--inject", help="a fault for the last node's upgrade (it rolls back)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--png", help="write each node's request latency and upgrade window")
    parser.add_argument("--clients", type=int, default=2, help="load clients per node")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s per client")
    parser.add_argument("--serve", action="store_true", help="only start the nodes")
    args = parser.parse_args()
    if not 1 <= args.nodes <= 4:
        parser.error("--nodes: 1 to 4 (the nodes of examples/fleet/inventory.yml)")
    if args.serve:
        serve(args.nodes)
        return
    mode = "rolling" if args.rolling else "parallel" if args.all_at_once else "canary"
    result = run(args.nodes, mode, args.inject, args.clients, args.rate)
    if args.png:
        plot(result, args.png)
    report = {k: v for k, v in result.items() if not k.startswith("_")}
    if args.json:
        print(json.dumps(report))
    else:
        for line in report["lines"]:
            print(line)
        print(
            f"play: {report['wall_s']:.1f} s wall, upgrade span {report['span_s']} s, Ansible "
            f"{report['ansible_before_s']} s before the first upgrade and "
            f"{report['ansible_after_s']} s after the last"
        )
        for host, node in report["per_node"].items():
            print(
                f"  {host}: now {node['version']}; {node['failed_requests']} failed requests, "
                f"{node['lost_writes']} lost writes of {node['acknowledged_writes']}, longest "
                f"stall {node['max_stall_ms']:.1f} ms during its upgrade "
                f"({node['max_stall_outside_upgrade_ms']:.1f} ms outside it)"
            )
    if report["playbook_status"] != 0 and not args.inject:
        print(result["_output"][-3000:], file=sys.stderr)
    clean = all(
        n["failed_requests"] == 0 and n["lost_writes"] == 0 for n in report["per_node"].values()
    )
    expected = args.inject is not None or report["playbook_status"] == 0
    sys.exit(0 if clean and expected else 1)


if __name__ == "__main__":
    main()
