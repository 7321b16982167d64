"""Many upgrades in a row under load, each at random plain, with an injected fault, or
with a release or acquire time-out too short to meet; the invariant after every one.

    python benchmarks/upgrade_soak.py [--upgrades 30] [--clients 4] [--seed S]
                                      [--workdir DIR]

After each upgrade the node must be in its known state (docs/maintenance.md): `status`
shows no invariant problem, the node devirtualized (an upgrade that rolled forward and
left it virtualized on purpose is finished with `devirtualize`, and that is counted),
and no more agents, listeners, threads or fds than at the start (device threads: at
most one per device). At the end the node is killed (SIGKILL) and every acknowledged
write is looked for on the disk image with the guest's recovery rules.

Reports per-outcome counts, the invariant's record, failed requests and lost writes
(JSON + one line).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from kvload import KvLoad
from online_upgrade import Node

from pyvmm.control_client import call
from pyvmm.microvisor.maintenance import FAULTS

LEAK_COUNTERS = ("agents", "listeners", "threads", "fds")
DEVICE_THREADS = ("virtio-blk", "virtio-vsock")  # one per device, started on first use
# Extra time-outs some faults need to end soon (the defaults are 10-20 s).
FAULT_TIMEOUTS = {"never-serving": "acquire=1", "release-timeout": "release=0.5"}
SHORT_TIMEOUTS = ("release=0.001", "acquire=0.001")


def choose(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """(what, extra `pyvmm upgrade` arguments)."""
    kind = rng.choice(("plain", "fault", "timeout"))
    if kind == "plain":
        return "plain", ()
    if kind == "timeout":
        timeout = rng.choice(SHORT_TIMEOUTS)
        return f"timeout {timeout}", ("--timeout", timeout)
    fault = rng.choice(FAULTS)
    extra = ("--inject", fault)
    if fault in FAULT_TIMEOUTS:
        extra += ("--timeout", FAULT_TIMEOUTS[fault])
    return fault, extra


def counters(status: dict) -> dict:
    resources = status["resources"]
    found = {k: resources[k] for k in LEAK_COUNTERS}
    found["threads"] = {k: v for k, v in found["threads"].items() if k not in DEVICE_THREADS}
    return found


def known_state(control: str, start: dict) -> list[str]:
    """What is wrong with the node's state now ([]: the invariant holds, nothing
    leaked). Polled a moment: the upgrade's own control connection may be closing."""
    deadline = time.monotonic() + 5
    while True:
        status = call(control, "status")
        now = counters(status)
        problems = list(status["invariant"])
        if status["mode"] != "devirtualized":
            problems.append(f"mode {status['mode']}: {status['virtualized_reason']}")
        if now != start:
            problems.append(f"leak: {start} -> {now}")
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.1)


def run(upgrades: int, clients: int, seed: int, workdir: str | None) -> dict:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    broken: list[dict] = []
    finished_by_devirtualize = 0
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, Node(tmp) as node:
        start = counters(call(node.control, "status"))
        load = KvLoad(node.port, clients).start()
        load.wait_started()
        time.sleep(0.5)
        version = "v1"
        for i in range(upgrades):
            kind, extra = choose(rng)
            target = "webkv-v2.elf" if version == "v1" else "webkv-v1.elf"
            reply = node.request_upgrade(target, *extra)
            if not reply.get("ok"):
                outcome = "request failed"
                broken.append({"upgrade": i, "kind": kind, "error": reply.get("error")})
            else:
                result = reply["result"]
                outcome = result["outcome"]
                version = result["after"]
                if outcome == "rolled_forward":  # left virtualized on purpose: finish it
                    call(node.control, "devirtualize")
                    finished_by_devirtualize += 1
            outcomes[outcome] += 1
            by_kind.setdefault(kind, Counter())[outcome] += 1
            problems = known_state(node.control, start)
            if problems:
                broken.append({"upgrade": i, "kind": kind, "problems": problems})
            time.sleep(0.2)
        load.stop()
        node.kill()
        lost = load.lost_on_disk(str(node.disk))
    return {
        "benchmark": "upgrade_soak",
        "seed": seed,
        "upgrades": upgrades,
        "clients": clients,
        "outcomes": dict(outcomes),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "finished_by_devirtualize": finished_by_devirtualize,
        "invariant_held": upgrades - len({b["upgrade"] for b in broken}),
        "invariant_broken": broken,
        "requests": len(load.samples),
        "failed_requests": len(load.failures),
        "failures": load.failures[:10],
        "reconnects": load.reconnects,
        "lost_writes": len(lost),  # on the disk image after SIGKILL
        "writes_checked": load.writes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upgrades", type=int, default=30)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="parent directory of the disk image")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    result = run(args.upgrades, args.clients, seed, args.workdir)
    report(
        result,
        f"upgrade_soak: {result['upgrades']} upgrades under load, outcomes "
        f"{result['outcomes']}; invariant held after {result['invariant_held']}; failed "
        f"requests {result['failed_requests']}; lost {result['lost_writes']} of "
        f"{result['writes_checked']} writes checked on disk; seed {seed}",
    )
    clean = not result["invariant_broken"] and not result["failed_requests"]
    sys.exit(0 if clean and result["lost_writes"] == 0 else 1)


if __name__ == "__main__":
    main()
