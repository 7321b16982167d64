"""The VMM killed at random moments of upgrades and rollbacks, and simulated power
cuts rebuilt from the disk's write journal: every acknowledged write survives."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import ROOT

from pyvmm.devices.virtio.blk_journal import (
    FLUSH,
    WRITE,
    Record,
    durable_writes,
    image_at,
    read_journal,
    unflushed,
)

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_an_image_after_a_power_cut_keeps_only_flushed_writes():
    records = [
        Record(WRITE, 1.0, 0, b"aa"),
        Record(WRITE, 2.0, 2, b"bb"),
        Record(FLUSH, 3.0, 2),  # covers both writes
        Record(WRITE, 4.0, 4, b"cc"),
        Record(FLUSH, 6.0, 3),
    ]
    base = b"\0" * 8
    assert durable_writes(records, 2.5) == 0
    assert image_at(base, records, 2.5) == base
    assert image_at(base, records, 3.0) == b"aabb\0\0\0\0"
    assert unflushed(records, 5.0) == [2]
    assert image_at(base, records, 5.0) == b"aabb\0\0\0\0"  # the unflushed write dropped
    assert image_at(base, records, 5.0, extra={2}) == b"aabbcc\0\0"  # or kept
    assert image_at(base, records, 7.0) == b"aabbcc\0\0"


def test_a_journal_is_continued_after_its_writer_died(tmp_path):
    """A disk back-end process restarted on the journal: the torn record its
    predecessor died in is cut off, and a flush covers the writes of both."""
    from pyvmm.devices.virtio.blk_journal import WriteJournal

    path = str(tmp_path / "disk.journal")
    first = WriteJournal(path)
    first.write(0, b"aa")
    first.close()
    with open(path, "ab") as f:
        f.write(b"W" + b"\0" * 10)  # torn: the writer was killed mid-append
    second = WriteJournal(path)
    second.write(2, b"bb")
    second.flushed(second.flush_issued())
    second.close()
    records = read_journal(path)
    assert [(r.kind, r.offset, r.data) for r in records] == [
        (WRITE, 0, b"aa"),
        (WRITE, 2, b"bb"),
        (FLUSH, 2, b""),
    ]
    assert image_at(b"\0" * 4, records, records[-1].time) == b"aabb"


@pytest.mark.kvm
def test_a_handful_of_kills_and_power_cuts_lose_nothing():
    import crash_soak

    result = crash_soak.run(kills=3, cuts=6, clients=2, seed=11, workdir=None)
    assert result["kills"] == 3 and result["cut_points"] >= 3
    assert result["boot_checked"] > 0 and result["cut_checked"] > 0
    assert result["lost_writes"] == 0, result


@pytest.mark.kvm
def test_the_power_cut_check_finds_writes_that_were_not_flushed(tmp_path):
    """The checker can fail: an image from before the acknowledged writes' flushes
    misses them."""
    import crash_soak
    from kvload import KvLoad, webkv_disk
    from online_upgrade import Node

    journal = tmp_path / "disk.journal"
    with Node(str(tmp_path), env={"PYVMM_DISK_JOURNAL": str(journal)}) as node:
        base = bytes(64 << 20)
        load = KvLoad(node.port, 2).start()
        load.wait_started()
        time.sleep(1.0)
        load.stop()
        node.kill()
    records = read_journal(str(journal))
    last_flush = max(r.time for r in records if r.kind == FLUSH)
    values, deleted = crash_soak.acknowledged_by(load.history, last_flush)
    assert values
    live = webkv_disk().live_keys(image_at(base, records, last_flush)) or {}
    assert all(live.get(k.encode()) == v for k, v in values.items())
    assert not any(k.encode() in live for k in deleted)
    # A cut before the first flush: every acknowledged value is missing.
    first_flush = min(r.time for r in records if r.kind == FLUSH)
    early = webkv_disk().live_keys(image_at(base, records, first_flush - 1e-6)) or {}
    assert sum(early.get(k.encode()) != v for k, v in values.items()) == len(values)
