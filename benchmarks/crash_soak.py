"""The VMM dies, and so may the host: SIGKILL pyvmm at random moments of upgrades and
rollbacks under load, and simulate power cuts from a record of the disk's writes.

    python benchmarks/crash_soak.py [--kills 20] [--cuts 10] [--clients 4] [--seed S]
                                    [--workdir DIR]

Each round boots a fresh ``pyvmm boot`` (webkv-v1) on the *same* disk image the last
round's killed node left, first checks over HTTP that it serves every write
acknowledged so far (latest value per key, deleted keys absent), then puts it under
load, starts an upgrade (to v2, or to v2 with an injected fault that rolls back) and
SIGKILLs the node at a random moment of it (0-1.5 s in: any phase, or the rollback).
webkv v1 and v2 share the disk format (one wal.c), so booting v1 on what v2 wrote is
a supported downgrade.

A SIGKILL keeps the host's page cache, so it proves nothing about durability. So each
round's node also records every write and flush of the disk (PYVMM_DISK_JOURNAL,
pyvmm/devices/virtio/blk_journal.py), and the checker rebuilds the image as a power
cut would leave it at ``--cuts`` moments of the round (half at flushes, half at random
moments between; at a random half of them a random part of the unflushed writes is kept
too, as a disk may have written some): the guest's recovery rules
(guest_kernels/tools/webkv_disk.py) must find every write acknowledged before that
moment. A last boot checks everything once more.

Reports kills, cut points, writes checked and writes lost (JSON + one line).
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from kvload import KvLoad, webkv_disk
from online_upgrade import KERNELS, Node, pyvmm

from pyvmm.devices.virtio.blk_journal import image_at, read_journal, unflushed
from pyvmm.node import DISK_JOURNAL_ENV

# Upgrades the node is killed in: a plain one, and faults that roll back.
UPGRADES = [
    (),
    ("--inject", "never-serving", "--timeout", "acquire=0.5"),
    ("--inject", "release-refused"),
    ("--inject", "crash-after-ready"),
    ("--inject", "release-timeout", "--timeout", "release=0.3"),
]
KILL_WINDOW_S = 1.5

History = list[tuple[str, str, bytes | None, float, float | None]]


class Expected:
    """Acknowledged writes: each key's latest value, and the keys deleted."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.deleted: set[str] = set()

    def count(self) -> int:
        return len(self.values) + len(self.deleted)

    def add(self, load: KvLoad) -> None:
        self.values.update(load.acked)
        self.deleted |= load.deleted

    def lost_in(self, live: dict[bytes, bytes]) -> list[str]:
        lost = [k for k, v in self.values.items() if live.get(k.encode()) != v]
        return lost + [k for k in self.deleted if k.encode() in live]


def acknowledged_by(history: History, cut: float) -> tuple[dict[str, bytes], set[str]]:
    """What ``history``'s clients had been told was written at ``cut``: per key the last
    acknowledged write, unless a later write to it was in flight (then either is
    right, and the key is not checked)."""
    by_key: dict[str, list] = {}
    for entry in sorted(history, key=lambda e: e[3]):
        by_key.setdefault(entry[0], []).append(entry)
    values: dict[str, bytes] = {}
    deleted: set[str] = set()
    for key, writes in by_key.items():
        last = None
        uncertain = False
        for _, method, value, sent, acked in writes:
            if sent > cut:
                break
            if acked is not None and acked <= cut:
                last, uncertain = (method, value), False
            else:
                uncertain = True
        if last is None or uncertain:
            continue
        if last[0] == "PUT":
            values[key] = last[1]
        else:
            deleted.add(key)
    return values, deleted


def power_cuts(
    base: bytes, journal: str, before: Expected, history: History, cuts: int, rng: random.Random
) -> tuple[int, int, int]:
    """Rebuild the image at ``cuts`` moments; returns (cut points, writes checked, lost)."""
    records = read_journal(journal)
    if not records:
        return 0, 0, 0
    flushes = [r.time for r in records if r.kind == b"F"]
    moments = rng.sample(flushes, min(len(flushes), cuts // 2))
    first, last = records[0].time, records[-1].time
    moments += [rng.uniform(first, last) for _ in range(cuts - len(moments))]
    tool = webkv_disk()
    checked = lost = 0
    for cut in moments:
        extra = None
        if rng.random() < 0.5:
            pending = unflushed(records, cut)
            extra = set(rng.sample(pending, rng.randint(0, len(pending))))
        live = tool.live_keys(image_at(base, records, cut, extra)) or {}
        values, deleted = acknowledged_by(history, cut)
        lost += len(before.lost_in(live))
        lost += sum(live.get(k.encode()) != v for k, v in values.items())
        lost += sum(k.encode() in live for k in deleted)
        checked += before.count() + len(values) + len(deleted)
    return len(moments), checked, lost


def serves_everything(node: Node, expected: Expected) -> list[str]:
    """Asks the freshly booted node for every acknowledged write."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=30)
    lost = []
    for key, value in expected.values.items():
        conn.request("GET", f"/kv/{key}")
        response = conn.getresponse()
        if (response.status, response.read()) != (200, value):
            lost.append(key)
    for key in expected.deleted:
        conn.request("GET", f"/kv/{key}")
        response = conn.getresponse()
        response.read()
        if response.status != 404:
            lost.append(key)
    conn.close()
    return lost


def run(kills: int, cuts: int, clients: int, seed: int, workdir: str | None) -> dict:
    rng = random.Random(seed)
    expected = Expected()
    totals = {"kills": 0, "cut_points": 0, "boot_checked": 0, "cut_checked": 0}
    lost = {"boot": 0, "power_cut": 0}
    kill_moments = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        image = Path(tmp) / "kv.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        for round_ in range(kills + 1):
            base = image.read_bytes()
            journal = Path(tmp) / f"round{round_}.journal"
            with Node(tmp, disk=image, env={DISK_JOURNAL_ENV: str(journal)}) as node:
                # A fresh boot on what the killed node left serves every write so far.
                lost["boot"] += len(serves_everything(node, expected))
                totals["boot_checked"] += expected.count()
                if round_ == kills:
                    break  # the last boot only checks
                load = KvLoad(node.port, clients, prefix=f"r{round_}c").start()
                load.wait_started()
                time.sleep(rng.uniform(0.5, 1.5))
                extra = rng.choice(UPGRADES)
                upgrade = subprocess.Popen(
                    pyvmm("upgrade", node.control, "--to", str(KERNELS / "webkv-v2.elf"), *extra),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                delay = rng.uniform(0.0, KILL_WINDOW_S)
                time.sleep(delay)
                node.kill()
                totals["kills"] += 1
                load.stop()
                progress = upgrade.communicate(timeout=60)[1]
                # `pyvmm upgrade` prints each phase as it ends: the kill came after the last.
                ended = re.findall(r"\] (\S+)\s+(?:done|failed)", progress)
                kill_moments.append(
                    {
                        "after_s": round(delay, 3),
                        "upgrade": " ".join(extra),
                        "after_phase": ended[-1] if ended else None,
                    }
                )
            before = Expected()
            before.values, before.deleted = dict(expected.values), set(expected.deleted)
            n, checked, missing = power_cuts(base, str(journal), before, load.history, cuts, rng)
            totals["cut_points"] += n
            totals["cut_checked"] += checked
            lost["power_cut"] += missing
            expected.add(load)
            journal.unlink()
    return {
        "benchmark": "crash_soak",
        "seed": seed,
        "clients": clients,
        **totals,
        "writes_checked": totals["boot_checked"] + totals["cut_checked"],
        "acknowledged_writes": expected.count(),
        "lost_writes_after_kill": lost["boot"],
        "lost_writes_at_power_cuts": lost["power_cut"],
        "lost_writes": lost["boot"] + lost["power_cut"],
        "killed_after_phase": dict(
            Counter(str(k["after_phase"]) for k in kill_moments).most_common()
        ),
        "kill_moments": kill_moments,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--cuts", type=int, default=10, help="power-cut points per kill round")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="parent directory of the disk image")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    result = run(args.kills, args.cuts, args.clients, seed, args.workdir)
    report(
        result,
        f"crash_soak: {result['kills']} SIGKILLs during upgrades/rollbacks under load, "
        f"{result['cut_points']} power-cut points; {result['writes_checked']} writes checked "
        f"({result['acknowledged_writes']} acknowledged), lost {result['lost_writes']} "
        f"(after kill {result['lost_writes_after_kill']}, at power cuts "
        f"{result['lost_writes_at_power_cuts']}); seed {seed}",
    )
    sys.exit(0 if result["lost_writes"] == 0 else 1)


if __name__ == "__main__":
    main()
