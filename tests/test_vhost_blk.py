"""virtio-blk served by its back-end process (pyvmm.backends.blk) through vhost-user,
driven by the Python test driver over the VMM's virtio-mmio transport. Guest RAM is
a memfd the back-end maps; kicks and interrupts are eventfds, as KVM's would be. One
process serves every front-end of a disk and holds its write lease."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time

import pytest
from test_virtio_driver import GuestDriver, no_backend_crash  # noqa: F401

from pyvmm.backends import channel
from pyvmm.backends import process as process_module
from pyvmm.backends import vhost_user as vu
from pyvmm.backends.blk_front import BlkProcess, ProcessBlk
from pyvmm.backends.process import BackendError
from pyvmm.devices.virtio import blk as b
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio import queue as q
from pyvmm.memory import MEMFD_4K, GuestMemory, MiB
from pyvmm.node import ServiceDevices

SECTORS = 256
MEM = 32 * MiB


class EventfdIrq:
    """An interrupt line as an eventfd, as the machine's irqfd is."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
        os.eventfd_write(self.fd, 1)

    def take(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


def make_driver(disk, window=(0, MEM), fenced=False, process=None, name="blk-test", partition=0):
    mem = GuestMemory(MEM, backing=MEMFD_4K)
    process = process or BlkProcess(str(disk))
    backend = ProcessBlk(process, mem, window, name, partition)
    if not fenced:
        process.grant(backend)
    irq = EventfdIrq()
    transport = m.VirtioMmioTransport(mem, backend, irq, "blk-test")
    drv = GuestDriver(backend, mem, transport)
    drv.irq = irq
    return drv


@pytest.fixture
def blk(disk):
    drv = make_driver(disk)
    (vq,) = drv.start()
    yield drv, vq
    drv.close()
    drv.backend.close()


def request(vq, segments, indirect=False):
    head = vq.post_indirect(segments) if indirect else vq.post(segments)
    ((used_head, length),) = vq.wait_used()
    assert used_head == head
    return head, length, vq.read_writable(head, length) if not indirect else None


def test_identity_config_and_a_separate_process(blk, disk):
    drv, _ = blk
    assert drv.rd(m.DEVICE_ID) == 2
    assert drv.rd(m.CONFIG, 8) == SECTORS
    assert drv.backend.process.pid != os.getpid() and drv.backend.process.alive
    assert drv.device_features() & b.VIRTIO_BLK_F_FLUSH


def test_read_write_flush_get_id_through_the_process(blk, disk):
    drv, vq = blk
    _, length, data = request(vq, [header(b.VIRTIO_BLK_T_IN, 3), 1024, 1])
    assert length == 1025 and data[-1] == b.VIRTIO_BLK_S_OK
    assert data[:-1] == disk.read_bytes()[3 * 512 : 5 * 512]
    payload = os.urandom(4096 * 3)
    chunks = [payload[i : i + 4096] for i in range(0, len(payload), 4096)]
    _, length, data = request(vq, [header(b.VIRTIO_BLK_T_OUT, 10), *chunks, 1])
    assert data == bytes([b.VIRTIO_BLK_S_OK])
    assert disk.read_bytes()[10 * 512 : 10 * 512 + len(payload)] == payload
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_FLUSH), 1])
    assert data == bytes([b.VIRTIO_BLK_S_OK])
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_GET_ID), 20, 1])
    assert data[:-1].rstrip(b"\0") == b"disk.img"
    _, length, _ = request(vq, [header(b.VIRTIO_BLK_T_OUT, 20), payload[:1024], 1], indirect=True)
    assert length == 1 and disk.read_bytes()[20 * 512 : 22 * 512] == payload[:1024]
    # interrupts went straight to the eventfd, not through the transport
    assert drv.irq.take() >= 1 and drv.transport.interrupts == 0
    assert drv.rd(m.INTERRUPT_STATUS) & m.INT_USED_BUFFER  # reported always (documented)


@pytest.mark.parametrize(
    "segments",
    [
        [header(b.VIRTIO_BLK_T_IN, SECTORS), 512, 1],  # past the end
        [header(b.VIRTIO_BLK_T_OUT, 0), b"x" * 100, 1],  # not whole sectors
        [b"\0" * 8, 1],  # short header
    ],
)
def test_bad_requests_are_ioerr(blk, segments):
    _, vq = blk
    _, _, data = request(vq, segments)
    assert data[-1] == b.VIRTIO_BLK_S_IOERR


def test_malformed_descriptor_is_dropped_and_the_back_end_goes_on(blk):
    drv, vq = blk
    slot = vq.free.pop()
    vq.write_desc(slot, drv.mem.size - 16, 4096, 0)  # runs off the end of RAM
    vq.chains[slot] = [slot]
    vq.publish(slot)
    vq.kick()
    assert vq.wait_used() == [(slot, 0)]
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_IN, 0), 512, 1])
    assert data[-1] == b.VIRTIO_BLK_S_OK


def test_dma_is_confined_to_the_memory_table(disk):
    # The back-end is given only the upper half of RAM: a buffer in the lower half
    # (where the driver's own arena starts) cannot be reached, even if the VMM's
    # transport lets the rings through.
    drv = make_driver(disk, window=(MEM // 2, MEM // 2))
    drv._next = MEM // 2 + 0x10000
    try:
        (vq,) = drv.start()
        slot_hdr, slot_buf, slot_st = vq.free.pop(), vq.free.pop(), vq.free.pop()
        drv.mem.write(vq.buf(slot_hdr), header(b.VIRTIO_BLK_T_IN, 0))
        vq.write_desc(slot_hdr, vq.buf(slot_hdr), 16, q.VIRTQ_DESC_F_NEXT, slot_buf)
        vq.write_desc(slot_buf, 0x1000, 512, q.VIRTQ_DESC_F_WRITE | q.VIRTQ_DESC_F_NEXT, slot_st)
        vq.write_desc(slot_st, vq.buf(slot_st), 1, q.VIRTQ_DESC_F_WRITE)
        drv.mem.fill(0x1000, 512, 0xAA)
        vq.chains[slot_hdr] = [slot_hdr, slot_buf, slot_st]
        vq.publish(slot_hdr)
        vq.kick()
        assert vq.wait_used() == [(slot_hdr, 0)]  # dropped
        assert drv.mem.read(0x1000, 512) == b"\xaa" * 512
    finally:
        drv.close()
        drv.backend.close()


def test_fenced_front_end_cannot_write(disk):
    drv = make_driver(disk, fenced=True)
    try:
        (vq,) = drv.start()
        _, _, data = request(vq, [header(b.VIRTIO_BLK_T_OUT, 0), b"y" * 512, 1])
        assert data == bytes([b.VIRTIO_BLK_S_IOERR])
        _, _, data = request(vq, [header(b.VIRTIO_BLK_T_IN, 0), 512, 1])
        assert data[-1] == b.VIRTIO_BLK_S_OK
    finally:
        drv.close()
        drv.backend.close()


def test_queue_ready_0_and_reset_stop_the_ring_and_it_restarts(blk, disk):
    drv, vq = blk
    request(vq, [header(b.VIRTIO_BLK_T_IN, 0), 512, 1])
    drv.wr(m.QUEUE_SEL, 0)
    drv.wr(m.QUEUE_READY, 0)  # GET_VRING_BASE, answered
    assert drv.rd(m.QUEUE_READY) == 0 and not drv.needs_reset()
    (vq,) = drv.start()  # reset, then a new session with new rings
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_IN, 1), 512, 1])
    assert data[:-1] == disk.read_bytes()[512:1024]
    assert not drv.backend.error


def test_a_killed_back_end_is_noticed_within_1s_and_cannot_hang_the_vcpu(blk):
    drv, vq = blk
    stop = threading.Event()

    def load() -> None:  # requests in flight while it dies
        while not stop.is_set():
            try:
                vq.post([header(b.VIRTIO_BLK_T_IN, 0), 512, 1])
                vq.wait_used(timeout=0.5)
            except (TimeoutError, RuntimeError):
                pass

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(0.3)
    dead = drv.backend.process.child
    killed = time.monotonic()
    os.kill(dead.pid, signal.SIGKILL)
    while dead.alive and time.monotonic() - killed < 5:
        time.sleep(0.01)
    noticed = time.monotonic() - killed
    stop.set()
    thread.join(5)
    assert not dead.alive and noticed < 1.0
    assert drv.needs_reset()  # the driver is told
    # The vCPU's MMIO accesses still answer at once: nothing waits on the dead process.
    start = time.monotonic()
    drv.wr(m.QUEUE_SEL, 0)
    drv.wr(m.QUEUE_READY, 0)
    drv.wr(m.STATUS, 0)
    assert drv.negotiate()
    assert time.monotonic() - start < 0.5


def test_a_hung_back_end_costs_the_vcpu_one_time_out_and_is_replaced(blk):
    drv, _ = blk
    hung = drv.backend.process.pid
    os.kill(hung, signal.SIGSTOP)
    start = time.monotonic()
    drv.wr(m.QUEUE_SEL, 0)
    drv.wr(m.QUEUE_READY, 0)  # GET_VRING_BASE times out: the back-end is killed
    drv.wr(m.STATUS, 0)  # no second wait
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 2.0, elapsed
    assert wait_for(lambda: drv.backend.process.restarts == 1 and drv.backend.process.pid != hung)
    (vq,) = drv.start()
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_IN, 0), 512, 1])
    assert data[-1] == b.VIRTIO_BLK_S_OK


def test_a_killed_back_end_is_restarted_and_a_reinitialising_driver_goes_on(blk, disk):
    drv, vq = blk
    dead = drv.backend.process.child
    os.kill(dead.pid, signal.SIGKILL)
    assert wait_for(lambda: drv.backend.process.restarts == 1 and not drv.backend.error)
    assert drv.needs_reset() and drv.backend.describe()["alive"]
    (vq,) = drv.start()  # the driver resets and sets the device up again
    payload = os.urandom(512)
    _, _, data = request(vq, [header(b.VIRTIO_BLK_T_OUT, 5), payload, 1])
    assert data == bytes([b.VIRTIO_BLK_S_OK])
    assert disk.read_bytes()[5 * 512 : 6 * 512] == payload
    assert dead.exit_status == -signal.SIGKILL and drv.backend.process.child is not dead


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- one process, several front-ends: the write lease and the control channel ---------


@pytest.fixture
def pair(disk):
    """Two partitions' front-ends of one disk, served by one process; the first holds
    the lease."""
    first = make_driver(disk, name="blk0", partition=0)
    second = make_driver(disk, fenced=True, process=first.backend.process, name="blk1", partition=1)
    queues = [first.start()[0], second.start()[0]]
    yield [first, second], queues
    for drv in (first, second):
        drv.close()
        drv.backend.close()


def write(vq, sector: int, payload: bytes) -> int:
    return request(vq, [header(b.VIRTIO_BLK_T_OUT, sector), payload, 1])[2][-1]


def test_two_front_ends_share_one_process_and_the_lease_moves(pair, disk):
    (first, second), (vq0, vq1) = pair
    process = first.backend.process
    assert second.backend.process is process and process.status()["lease"] == "blk0"
    assert write(vq0, 1, b"a" * 512) == b.VIRTIO_BLK_S_OK
    assert write(vq1, 2, b"b" * 512) == b.VIRTIO_BLK_S_IOERR  # fenced
    process.grant(second.backend)  # the control op "lease"
    assert process.status()["lease"] == "blk1"
    assert write(vq0, 3, b"c" * 512) == b.VIRTIO_BLK_S_IOERR  # the old holder: no more
    assert write(vq1, 4, b"d" * 512) == b.VIRTIO_BLK_S_OK
    image = disk.read_bytes()
    assert image[512:1024] == b"a" * 512 and image[2048:2560] == b"d" * 512
    assert image[1024:1536] != b"b" * 512 and image[1536:2048] != b"c" * 512
    # both read
    assert request(vq0, [header(b.VIRTIO_BLK_T_IN, 4), 512, 1])[2][:-1] == b"d" * 512


def test_status_counts_the_calls_of_each_ring(pair):
    (first, _), (vq0, _) = pair
    before = first.backend.process.status()["devices"]["blk0"]["rings"][0]["calls"]
    first.irq.take()
    for sector in range(5):
        request(vq0, [header(b.VIRTIO_BLK_T_IN, sector), 512, 1])
    devices = first.backend.process.status()["devices"]
    ring = devices["blk0"]["rings"][0]
    assert ring["running"] and devices["blk0"]["active"] and devices["blk0"]["partition"] == 0
    # every call the back-end counted reached the interrupt eventfd, one per request here
    assert ring["calls"] - before == first.irq.take() >= 5 and ring["kicks"] >= 5
    assert devices["blk1"]["rings"][0]["calls"] == 0 and devices["blk1"]["errors"] == 0


def test_bad_control_messages_get_an_error_and_the_process_goes_on(pair):
    (first, _), (vq0, _) = pair
    process = first.backend.process
    sock = process.child.sock

    def raw(body: bytes, fds=()) -> dict:
        vu.send_frame(sock, channel.LENGTH.pack(len(body)) + body, list(fds))
        return channel.receive(sock, 2.0)[0]

    assert not raw(b"{not json")["ok"]
    assert not raw(b"[1, 2]")["ok"]
    assert "unknown op" in raw(b'{"op": "frobnicate", "id": 1}')["error"]
    efd = os.eventfd(0)
    try:
        reply = raw(b'{"op": "add", "id": 2, "name": "x", "partition": 0}', [efd])
        assert not reply["ok"] and "socket" in reply["error"]
        assert "takes no fds" in raw(b'{"op": "status", "id": 3}', [efd])["error"]
    finally:
        os.close(efd)
    assert "one fd" in raw(b'{"op": "add", "id": 4, "name": "y", "partition": 0}')["error"]
    assert "no front-end" in raw(b'{"op": "lease", "id": 5, "holder": "nobody"}')["error"]
    assert process.alive and process.status()["lease"] == "blk0"
    assert request(vq0, [header(b.VIRTIO_BLK_T_IN, 0), 512, 1])[2][-1] == b.VIRTIO_BLK_S_OK


def test_a_killed_shared_process_restarts_once_for_both_front_ends(pair, disk):
    (first, second), _ = pair
    process = first.backend.process
    dead = process.child
    os.kill(dead.pid, signal.SIGKILL)
    assert wait_for(lambda: process.restarts == 1 and not first.backend.error)
    assert wait_for(lambda: not second.backend.error)
    assert first.needs_reset() and second.needs_reset()
    assert process.child is not dead and process.restarts == 1
    assert process.status()["lease"] == "blk0"  # the holder the VMM knew, re-sent
    vq0, vq1 = first.start()[0], second.start()[0]  # the drivers re-initialise
    assert write(vq0, 6, b"e" * 512) == b.VIRTIO_BLK_S_OK
    assert write(vq1, 7, b"f" * 512) == b.VIRTIO_BLK_S_IOERR
    assert request(vq1, [header(b.VIRTIO_BLK_T_IN, 6), 512, 1])[2][:-1] == b"e" * 512


def test_moving_the_lease_waits_for_the_write_in_flight(pair, disk):
    (first, second), (vq0, vq1) = pair
    process = first.backend.process
    process.request("fault", write_delay_s=0.5)  # every write holds the lease 0.5 s
    payload = os.urandom(4096)
    head = vq0.post([header(b.VIRTIO_BLK_T_OUT, 8), payload, 1])
    assert wait_for(lambda: process.status()["writing"] == 1, 5)  # in flight
    start = time.monotonic()
    process.grant(second.backend)
    waited = time.monotonic() - start
    # grant returned only once the write was over: it completed, and is on disk
    assert process.status()["writing"] == 0 and waited > 0.05, waited
    ((used_head, length),) = vq0.wait_used()
    assert used_head == head and vq0.read_writable(head, length)[-1] == b.VIRTIO_BLK_S_OK
    assert disk.read_bytes()[8 * 512 : 8 * 512 + len(payload)] == payload
    process.request("fault", write_delay_s=0)
    assert write(vq0, 20, b"x" * 512) == b.VIRTIO_BLK_S_IOERR
    assert write(vq1, 21, b"y" * 512) == b.VIRTIO_BLK_S_OK
    assert "write_delay_s" in process_error(process, write_delay_s=-1)


def test_fail_io_fails_every_io_of_one_front_end_only(pair, disk):
    """The upgrade's disk-eio fault with a back-end process: ``ProcessBlk.fail_io``."""
    (first, _), (vq0, vq1) = pair
    first.backend.fail_io = True
    assert write(vq0, 30, b"z" * 512) == b.VIRTIO_BLK_S_IOERR  # the holder's writes fail
    assert request(vq0, [header(b.VIRTIO_BLK_T_IN, 30), 512, 1])[2][-1] == b.VIRTIO_BLK_S_IOERR
    assert request(vq1, [header(b.VIRTIO_BLK_T_IN, 30), 512, 1])[2][-1] == b.VIRTIO_BLK_S_OK
    first.backend.fail_io = False
    assert first.backend.fail_io is False
    assert write(vq0, 30, b"z" * 512) == b.VIRTIO_BLK_S_OK
    assert "fail_io" in process_error(first.backend.process, fail_io={"blk9": True})


def process_error(process, **fields) -> str:
    try:
        process.request("fault", **fields)
    except BackendError as exc:
        return str(exc)
    raise AssertionError("the request was not refused")


def test_a_hung_shared_process_is_killed_and_both_front_ends_are_told(pair):
    (first, second), _ = pair
    process = first.backend.process
    hung = process.pid
    os.kill(hung, signal.SIGSTOP)
    start = time.monotonic()
    first.wr(m.QUEUE_SEL, 0)
    first.wr(m.QUEUE_READY, 0)  # GET_VRING_BASE times out: the process is killed
    assert time.monotonic() - start < 2.0
    assert wait_for(lambda: second.needs_reset(), 2)  # the other front-end is told too
    assert wait_for(lambda: process.restarts == 1 and process.pid != hung)
    assert wait_for(lambda: not first.backend.error and not second.backend.error)
    for drv in (first, second):
        (vq,) = drv.start()
        assert request(vq, [header(b.VIRTIO_BLK_T_IN, 0), 512, 1])[2][-1] == b.VIRTIO_BLK_S_OK


def test_the_node_moves_the_disk_through_the_process(pair):
    (first, second), (vq0, vq1) = pair
    services = ServiceDevices()
    services.backends = "process"
    services.disks = [first.backend, second.backend]
    services.lease = first.backend.process  # as add_service_devices sets it
    assert services.disk_writer() == 0
    services.give_disk(1)  # no longer refused between partitions
    assert services.disk_writer() == 1 and services.lease.status()["lease"] == "blk1"
    assert write(vq0, 30, b"z" * 512) == b.VIRTIO_BLK_S_IOERR
    assert write(vq1, 31, b"z" * 512) == b.VIRTIO_BLK_S_OK
    backends = services.backend_status()
    assert backends["blk0"]["pid"] == backends["blk1"]["pid"] and backends["blk1"]["alive"]


def test_after_max_restarts_the_front_ends_stay_failed(pair, monkeypatch):
    (first, second), _ = pair
    process = first.backend.process
    monkeypatch.setattr(process_module, "MAX_RESTARTS", 1)
    os.kill(process.pid, signal.SIGKILL)
    assert wait_for(lambda: process.restarts == 1 and not first.backend.error)
    last = process.pid
    os.kill(last, signal.SIGKILL)
    assert wait_for(lambda: not process.alive)
    time.sleep(0.3)  # no third process comes
    assert process.restarts == 1 and process.pid == last
    for drv in (first, second):
        assert drv.needs_reset() and not drv.backend.describe()["alive"]
        assert drv.backend.describe()["error"]
        drv.start()  # the driver's set-up fails at once, nothing waits on a dead process
        assert drv.needs_reset()
