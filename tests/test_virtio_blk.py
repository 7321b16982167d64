"""virtio-blk against a temporary host file, driven by the Python test driver."""

from __future__ import annotations

import errno
import os
import struct
import threading

import pytest
from test_virtio_driver import TIMEOUT, GuestDriver, no_backend_crash  # noqa: F401

from pyvmm.devices.virtio import blk as b
from pyvmm.devices.virtio import mmio as m

SECTORS = 256


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2) + b"tail")  # a partial last sector
    return path


@pytest.fixture
def blk(disk):
    drv = GuestDriver(b.VirtioBlk(str(disk), serial="pyvmm-disk-0"))
    (vq,) = drv.start()
    yield drv, vq
    drv.close()


def request(vq, segments, indirect=False):
    head = vq.post_indirect(segments) if indirect else vq.post(segments)
    ((used_head, length),) = vq.wait_used()
    assert used_head == head
    data = vq.read_writable(head, length) if not indirect else None
    return head, length, data


def status_of(data: bytes | None, length: int) -> int:
    assert data is not None and len(data) == length
    return data[-1]


def test_identity_and_config(blk, disk):
    drv, _ = blk
    assert drv.rd(m.DEVICE_ID) == 2
    features = drv.device_features()
    assert features & b.VIRTIO_BLK_F_FLUSH and not features & b.VIRTIO_BLK_F_RO
    capacity = drv.rd(m.CONFIG, 8)
    assert capacity == SECTORS == disk.stat().st_size // 512
    assert drv.rd(m.CONFIG + 12) == 256 - 2  # seg_max


def test_read_sectors(blk, disk):
    _, vq = blk
    _, length, data = request(vq, [header(b.VIRTIO_BLK_T_IN, 3), 1024, 1])
    assert length == 1025 and status_of(data, length) == b.VIRTIO_BLK_S_OK
    assert data[:-1] == disk.read_bytes()[3 * 512 : 5 * 512]


def test_write_then_read_back_scattered(blk, disk):
    _, vq = blk
    payload = os.urandom(4096 * 3)
    chunks = [payload[i : i + 4096] for i in range(0, len(payload), 4096)]
    _, length, data = request(vq, [header(b.VIRTIO_BLK_T_OUT, 10), *chunks, 1])
    assert length == 1 and data == bytes([b.VIRTIO_BLK_S_OK])
    assert disk.read_bytes()[10 * 512 : 10 * 512 + len(payload)] == payload
    _, length, data = request(vq, [header(b.VIRTIO_BLK_T_IN, 10), 4096, 4096, 4096, 1])
    assert data == payload + b"\0"


def test_header_and_data_may_share_or_split_descriptors(blk, disk):
    _, vq = blk
    payload = os.urandom(512)
    hdr = header(b.VIRTIO_BLK_T_OUT, 1)
    _, _, data = request(vq, [hdr[:5], hdr[5:] + payload[:100], payload[100:], 1])
    assert data == b"\0"
    assert disk.read_bytes()[512:1024] == payload


def test_indirect_request(blk, disk):
    _drv, vq = blk
    payload = os.urandom(1024)
    _head, length, _ = request(vq, [header(b.VIRTIO_BLK_T_OUT, 20), payload, 1], indirect=True)
    assert length == 1
    assert disk.read_bytes()[20 * 512 : 21 * 512 + 512] == payload


def test_flush_reaches_fsync(blk, monkeypatch):
    _, vq = blk
    calls = []
    monkeypatch.setattr(b.os, "fsync", lambda fd: calls.append(fd))
    _, length, data = request(vq, [header(b.VIRTIO_BLK_T_FLUSH), 1])
    assert data == bytes([b.VIRTIO_BLK_S_OK]) and length == 1
    assert len(calls) == 1 and os.fstat(calls[0]).st_ino == os.fstat(vq.drv.backend._fd).st_ino


def test_flush_failure_is_ioerr(blk, monkeypatch):
    _, vq = blk

    def fail(fd):
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(b.os, "fsync", fail)
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_FLUSH), 1])
    assert data == bytes([b.VIRTIO_BLK_S_IOERR])


def test_read_io_error_is_ioerr(blk, monkeypatch):
    _, vq = blk

    def fail(fd, views, offset):
        raise OSError(errno.EIO, "bad sector")

    monkeypatch.setattr(b.os, "preadv", fail)
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_IN, 0), 512, 1])
    assert data[-1] == b.VIRTIO_BLK_S_IOERR


def test_get_id(blk):
    _, vq = blk
    _, length, data = request(vq, [header(b.VIRTIO_BLK_T_GET_ID), 20, 1])
    assert length == 21
    assert data[:20] == b"pyvmm-disk-0".ljust(20, b"\0") and data[20] == b.VIRTIO_BLK_S_OK


@pytest.mark.parametrize(
    "segments",
    [
        [header(b.VIRTIO_BLK_T_IN, SECTORS), 512, 1],  # just past the end
        [header(b.VIRTIO_BLK_T_IN, SECTORS - 1), 1024, 1],  # straddles the end
        [header(b.VIRTIO_BLK_T_IN, (1 << 64) - 1), 512, 1],  # overflowing sector
        [header(b.VIRTIO_BLK_T_OUT, SECTORS), bytes(512), 1],
        [header(b.VIRTIO_BLK_T_IN, 0), 100, 1],  # not whole sectors
        [b"\1\0\0", 1],  # header too short
    ],
    ids=["past-end", "straddle", "huge-sector", "write-past-end", "partial", "short-header"],
)
def test_bad_requests_are_ioerr(blk, disk, segments):
    _, vq = blk
    before = disk.read_bytes()
    _, _length, data = request(vq, segments)
    assert data[-1] == b.VIRTIO_BLK_S_IOERR
    assert disk.read_bytes() == before
    assert disk.stat().st_size == len(before)


def test_unknown_type_is_unsupp(blk):
    _, vq = blk
    for kind in (2, 11, 13, 0xFFFF_FFFF):
        _, _, data = request(vq, [header(kind), 1])
        assert data == bytes([b.VIRTIO_BLK_S_UNSUPP])


def test_request_without_status_byte_is_dropped(blk):
    _drv, vq = blk
    head = vq.post([header(b.VIRTIO_BLK_T_IN)])
    assert vq.wait_used() == [(head, 0)]
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_GET_ID), 20, 1])
    assert data[-1] == b.VIRTIO_BLK_S_OK


def test_read_only_disk(disk):
    drv = GuestDriver(b.VirtioBlk(str(disk), read_only=True))
    try:
        assert drv.device_features() & b.VIRTIO_BLK_F_RO
        (vq,) = drv.start()
        before = disk.read_bytes()
        _, _, data = request(vq, [header(b.VIRTIO_BLK_T_OUT, 0), bytes(512), 1])
        assert data == bytes([b.VIRTIO_BLK_S_IOERR]) and disk.read_bytes() == before
    finally:
        drv.close()


def test_many_requests_in_flight(blk, disk):
    _, vq = blk
    heads = {}
    for sector in range(0, 160, 2):  # 80 chains of 3 descriptors fill the queue
        heads[vq.post([header(b.VIRTIO_BLK_T_IN, sector), 1024, 1], kick=False)] = sector
    vq.kick()
    used = vq.wait_used(len(heads))
    content = disk.read_bytes()
    for head, length in used:
        sector = heads[head]
        assert vq.read_writable(head, length) == content[sector * 512 : sector * 512 + 1024] + b"\0"


def test_malformed_descriptor_is_dropped_and_device_goes_on(blk):
    drv, vq = blk
    vq.write_desc(0, drv.mem.size - 8, 16, 0)
    vq.publish(0)
    vq.kick()
    assert vq.wait_used() == [(0, 0)]
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_GET_ID), 20, 1])
    assert data[-1] == b.VIRTIO_BLK_S_OK
    assert not drv.needs_reset()


def test_broken_ring_sets_needs_reset(blk):
    drv, vq = blk
    vq.publish(4096)  # head beyond the queue size
    vq.kick()
    deadline = threading.Event()
    for _ in range(int(TIMEOUT * 100)):
        if drv.needs_reset():
            break
        deadline.wait(0.01)
    assert drv.needs_reset()
    assert drv.rd(m.INTERRUPT_STATUS) & m.INT_CONFIG_CHANGE
    (vq,) = drv.start()  # a reset brings it back
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_GET_ID), 20, 1])
    assert data[-1] == b.VIRTIO_BLK_S_OK


def test_reset_drops_queued_requests_and_waits_for_the_running_one(blk, monkeypatch):
    drv, vq = blk
    entered, release = threading.Event(), threading.Event()
    calls = []

    def slow_fsync(fd):
        calls.append(fd)
        entered.set()
        release.wait(TIMEOUT)

    monkeypatch.setattr(b.os, "fsync", slow_fsync)
    vq.post([header(b.VIRTIO_BLK_T_FLUSH), 1], kick=False)
    vq.post([header(b.VIRTIO_BLK_T_FLUSH), 1], kick=False)
    vq.kick()
    assert entered.wait(TIMEOUT)
    resetter = threading.Thread(target=drv.wr, args=(m.STATUS, 0))
    resetter.start()
    resetter.join(0.2)
    assert resetter.is_alive()  # waits for the request in progress
    release.set()
    resetter.join(TIMEOUT)
    assert not resetter.is_alive()
    assert drv.rd(m.STATUS) == 0
    used_before = vq.used_idx()
    threading.Event().wait(0.1)
    assert len(calls) == 1  # the queued flush was dropped with the reset
    assert vq.used_idx() == used_before  # and nothing is written to the old rings
    monkeypatch.setattr(b.os, "fsync", lambda fd: calls.append(fd))
    (vq,) = drv.start()
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_FLUSH), 1])
    assert data == b"\0" and len(calls) == 2


class GatedIo:
    """The back-end's reads and writes wait for the test: a request held in flight."""

    def __init__(self, backend: b.VirtioBlk, monkeypatch) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        real = backend._io

        def io(*args):
            self.entered.set()
            assert self.release.wait(TIMEOUT)
            return real(*args)

        monkeypatch.setattr(backend, "_io", io)


def read_request(vq, sector: int) -> int:
    return vq.post([header(b.VIRTIO_BLK_T_IN, sector), 4096, 1])


def test_queue_ready_0_returns_once_the_request_in_progress_is_done(blk, disk, monkeypatch):
    drv, vq = blk
    gate = GatedIo(drv.backend, monkeypatch)
    head = read_request(vq, 8)
    read_request(vq, 16)  # queued behind it: never served
    assert gate.entered.wait(TIMEOUT)
    drv.wr(m.QUEUE_SEL, 0)
    stopper = threading.Thread(target=drv.wr, args=(m.QUEUE_READY, 0))
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # the driver may not reuse the buffers yet
    gate.release.set()
    stopper.join(TIMEOUT)
    assert drv.rd(m.QUEUE_READY) == 0
    # The request finished into its buffers before QueueReady=0 returned, and nothing
    # moves in the queue's memory afterwards: not even its used ring.
    (data_slot,) = vq.chains[head][1:2]
    assert vq.mem.read(vq.buf(data_slot), 4096) == disk.read_bytes()[8 * 512 : 8 * 512 + 4096]
    snapshot = vq.mem.read(0, vq.mem.size)
    threading.Event().wait(0.2)
    assert vq.mem.read(0, vq.mem.size) == snapshot
    assert vq.used_idx() == 0 and drv.backend.requests == 1


def test_quiesce_is_bounded_and_a_late_completion_reaches_no_new_ring(blk, monkeypatch):
    drv, vq = blk
    gate = GatedIo(drv.backend, monkeypatch)
    read_request(vq, 0)
    read_request(vq, 8)
    assert gate.entered.wait(TIMEOUT)
    assert not drv.transport.quiesce(0.1)  # I/O into guest RAM cannot be abandoned
    assert drv.rd(m.STATUS) == 0
    # A new driver session sets up new rings while the old request is still running
    # (its reset gives up waiting after the back-end's bound).
    monkeypatch.setattr(b, "RESET_TIMEOUT_S", 0.05)
    started = []
    starter = threading.Thread(target=lambda: started.append(drv.start()))
    starter.start()
    until_ready = threading.Event()
    for _ in range(int(TIMEOUT / 0.01)):
        if drv.transport.queues[0].ready:
            until_ready.set()
            break
        threading.Event().wait(0.01)
    assert until_ready.is_set()
    gate.release.set()  # the old request ends now: its completion must go nowhere
    starter.join(TIMEOUT)
    ((new_vq,),) = started
    assert drv.transport.quiesce(TIMEOUT)  # the straggler is done: nothing runs now
    assert vq.used_idx() == 0 and new_vq.used_idx() == 0
    assert drv.backend.requests == 1  # the request queued behind it was never taken
    (new_vq,) = drv.start()
    _, length, data = request(new_vq, [header(b.VIRTIO_BLK_T_GET_ID), 20, 1])
    assert status_of(data, length) == b.VIRTIO_BLK_S_OK


def test_notifications_from_a_poller_thread(blk, disk):
    drv, vq = blk
    heads = [vq.post([header(b.VIRTIO_BLK_T_IN, i), 512, 1], kick=False) for i in range(32)]
    poller = threading.Thread(target=lambda: [drv.transport.notify(0) for _ in range(50)])
    poller.start()
    poller.join(TIMEOUT)
    assert sorted(h for h, _ in vq.wait_used(32)) == sorted(heads)


def test_close_is_idempotent_and_stops_the_worker(disk):
    backend = b.VirtioBlk(str(disk))
    drv = GuestDriver(backend)
    drv.start()
    drv.close()
    assert backend._thread is not None and not backend._thread.is_alive()
    backend.close()


def test_front_ends_of_a_shared_disk_write_only_with_the_lease(disk):
    lease = b.WriteLease()
    drivers = [GuestDriver(b.VirtioBlk(str(disk), lease=lease)) for _ in range(2)]
    try:
        (qa,), (qb,) = (drv.start() for drv in drivers)
        lease.grant(drivers[0].backend)

        def write(vq, sector: int, data: bytes) -> int:
            _, length, status = request(vq, [header(b.VIRTIO_BLK_T_OUT, sector), data, 1])
            return status_of(status, length)

        def read(vq, sector: int) -> bytes:
            _, _, data = request(vq, [header(b.VIRTIO_BLK_T_IN, sector), 512, 1])
            return data[:-1]

        assert write(qa, 1, b"A" * 512) == b.VIRTIO_BLK_S_OK
        assert write(qb, 2, b"B" * 512) == b.VIRTIO_BLK_S_IOERR  # fenced
        assert read(qb, 1) == b"A" * 512  # but it reads what the holder wrote
        lease.grant(drivers[1].backend)
        assert write(qa, 3, b"a" * 512) == b.VIRTIO_BLK_S_IOERR
        assert write(qb, 2, b"B" * 512) == b.VIRTIO_BLK_S_OK
        data = disk.read_bytes()
        assert data[512:1024] == b"A" * 512 and data[1024:1536] == b"B" * 512
        assert data[1536:2048] != b"a" * 512
    finally:
        for drv in drivers:
            drv.close()
