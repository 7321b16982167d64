"""A Python virtio driver playing the guest (shared by the test_virtio_* modules), and
tests of the virtio-mmio transport and the split virtqueue with it. No KVM needed."""

from __future__ import annotations

import logging
import struct
import threading
import time

import pytest

from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio import queue as q
from pyvmm.devices.virtio.backend import (
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioBackend,
)
from pyvmm.errors import MemoryAccessError
from pyvmm.memory import GuestMemory, MiB

MEM_SIZE = 32 * MiB
ARENA = 0x10_0000  # driver allocations start at 1 MiB
DESC = struct.Struct("<QIHH")
TIMEOUT = 10.0


class FakeIrq:
    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()

    def trigger(self) -> None:
        self.count += 1
        self.event.set()


class DriverQueue:
    """One split queue laid out in guest RAM; each descriptor slot owns a buffer."""

    def __init__(self, drv: GuestDriver, index: int, size: int, buf_size: int) -> None:
        self.drv = drv
        self.mem = drv.mem
        self.index = index
        self.size = size
        self.buf_size = buf_size
        desc, avail, used = q.ring_sizes(size)
        self.desc = drv.alloc(desc, 16)
        self.avail = drv.alloc(avail, 2)
        self.used = drv.alloc(used, 4)
        self.buffers = drv.alloc(size * buf_size, 16)
        self.free = list(range(size - 1, -1, -1))
        self.chains: dict[int, list[int]] = {}
        self.avail_idx = 0
        self.last_used = 0

    def buf(self, slot: int) -> int:
        return self.buffers + slot * self.buf_size

    def write_desc(self, slot: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(self.desc + 16 * slot, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        """Put ``head`` in the avail ring and bump avail.idx (entry first, then index)."""
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def post(self, segments: list[bytes | int], kick: bool = True) -> int:
        """A chain of readable (bytes) and writable (int length) segments; returns head."""
        if len(segments) > len(self.free):
            raise RuntimeError("queue full")
        slots = [self.free.pop() for _ in segments]
        for k, (slot, seg) in enumerate(zip(slots, segments, strict=True)):
            nxt = slots[k + 1] if k + 1 < len(slots) else 0
            flags = q.VIRTQ_DESC_F_NEXT if k + 1 < len(slots) else 0
            if isinstance(seg, int):
                assert seg <= self.buf_size
                self.write_desc(slot, self.buf(slot), seg, flags | q.VIRTQ_DESC_F_WRITE, nxt)
            else:
                assert len(seg) <= self.buf_size
                self.mem.write(self.buf(slot), seg)
                self.write_desc(slot, self.buf(slot), len(seg), flags, nxt)
        self.chains[slots[0]] = slots
        self.publish(slots[0])
        if kick:
            self.kick()
        return slots[0]

    def post_indirect(self, segments: list[bytes | int]) -> int:
        """The same, as one descriptor pointing at an indirect table."""
        table = self.drv.alloc(16 * len(segments), 16)
        for k, seg in enumerate(segments):
            addr = self.drv.alloc(seg if isinstance(seg, int) else len(seg), 8)
            flags = q.VIRTQ_DESC_F_NEXT if k + 1 < len(segments) else 0
            if isinstance(seg, int):
                flags |= q.VIRTQ_DESC_F_WRITE
                length = seg
            else:
                self.mem.write(addr, seg)
                length = len(seg)
            self.mem.write(table + 16 * k, DESC.pack(addr, length, flags, k + 1))
        slot = self.free.pop()
        self.write_desc(slot, table, 16 * len(segments), q.VIRTQ_DESC_F_INDIRECT)
        self.chains[slot] = [slot]
        self.publish(slot)
        self.kick()
        return slot

    def kick(self) -> None:
        self.drv.wr(m.QUEUE_NOTIFY, self.index)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements since the last call; their descriptors become free again."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.last_used % self.size
            head, length = struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8))
            out.append((head, length))
            self.free.extend(self.chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def wait_used(self, count: int = 1, timeout: float = TIMEOUT) -> list[tuple[int, int]]:
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            got += self.take_used()
            if len(got) >= count:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue {self.index}: {len(got)}/{count} used after {timeout}s")
            time.sleep(0.001)
        return got

    def read_writable(self, head: int, length: int) -> bytes:
        """The first ``length`` bytes the device wrote into chain ``head``."""
        out = bytearray()
        for slot in self.chains.get(head, []) or self._walk(head):
            addr, dlen, flags, _ = DESC.unpack(self.mem.read(self.desc + 16 * slot, 16))
            if flags & q.VIRTQ_DESC_F_WRITE:
                out += self.mem.read(addr, dlen)
        return bytes(out[:length])

    def _walk(self, head: int) -> list[int]:
        slots, slot = [], head
        while True:
            slots.append(slot)
            _, _, flags, nxt = DESC.unpack(self.mem.read(self.desc + 16 * slot, 16))
            if not flags & q.VIRTQ_DESC_F_NEXT:
                return slots
            slot = nxt


class GuestDriver:
    """Drives a transport through its registers the way a virtio-mmio driver does."""

    def __init__(
        self,
        backend: VirtioBackend,
        mem: GuestMemory | None = None,
        transport: m.VirtioMmioTransport | None = None,
        arena: int = ARENA,
    ) -> None:
        """Over a transport of its own, or over ``transport`` (a machine's device, whose
        interrupts then go where the machine sends them), allocating from ``arena``."""
        self.mem = mem or GuestMemory(MEM_SIZE)
        self.irq = FakeIrq()
        self.transport = transport or m.VirtioMmioTransport(self.mem, backend, self.irq, "test")
        self.backend = backend
        self._next = arena
        self.queues: list[DriverQueue] = []

    def alloc(self, size: int, align: int) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        self._next = addr + size
        assert self._next <= self.mem.size, "test arena exhausted"
        return addr

    def rd(self, offset: int, width: int = 4) -> int:
        buf = bytearray(width)
        self.transport.read(offset, memoryview(buf))
        return int.from_bytes(buf, "little")

    def wr(self, offset: int, value: int, width: int = 4) -> None:
        self.transport.write(offset, memoryview(value.to_bytes(width, "little")))

    def device_features(self) -> int:
        self.wr(m.DEVICE_FEATURES_SEL, 0)
        low = self.rd(m.DEVICE_FEATURES)
        self.wr(m.DEVICE_FEATURES_SEL, 1)
        return low | self.rd(m.DEVICE_FEATURES) << 32

    def negotiate(self, features: int | None = None) -> bool:
        self.wr(m.STATUS, 0)
        self.wr(m.STATUS, m.STATUS_ACKNOWLEDGE)
        self.wr(m.STATUS, m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER)
        wanted = self.device_features() if features is None else features
        for sel in (0, 1):
            self.wr(m.DRIVER_FEATURES_SEL, sel)
            self.wr(m.DRIVER_FEATURES, (wanted >> (32 * sel)) & 0xFFFF_FFFF)
        self.wr(m.STATUS, m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER | m.STATUS_FEATURES_OK)
        return bool(self.rd(m.STATUS) & m.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None, buf_size: int = 4096) -> DriverQueue:
        self.wr(m.QUEUE_SEL, index)
        size = size or self.rd(m.QUEUE_NUM_MAX)
        dq = DriverQueue(self, index, size, buf_size)
        self.wr(m.QUEUE_NUM, size)
        for reg, addr in ((m.QUEUE_DESC_LOW, dq.desc), (m.QUEUE_DRIVER_LOW, dq.avail)):
            self.wr(reg, addr & 0xFFFF_FFFF)
            self.wr(reg + 4, addr >> 32)
        self.wr(m.QUEUE_DEVICE_LOW, dq.used & 0xFFFF_FFFF)
        self.wr(m.QUEUE_DEVICE_HIGH, dq.used >> 32)
        self.wr(m.QUEUE_READY, 1)
        return dq

    def start(
        self, features: int | None = None, sizes: tuple[int, ...] = (), buf_size: int = 4096
    ) -> list[DriverQueue]:
        assert self.negotiate(features)
        count = len(self.transport.queues)
        self.queues = [
            self.setup_queue(i, sizes[i] if i < len(sizes) else None, buf_size)
            for i in range(count)
        ]
        self.wr(m.STATUS, self.rd(m.STATUS) | m.STATUS_DRIVER_OK)
        return self.queues

    def needs_reset(self) -> bool:
        return bool(self.rd(m.STATUS) & m.STATUS_NEEDS_RESET)

    def close(self) -> None:
        self.transport.close()
        self.mem.close()


class NullBackend(VirtioBackend):
    """Records kicks; returns every chain with the number of writable bytes."""

    device_id = 0x42
    queue_sizes = (8, 16)
    features = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | 1 << 3

    def __init__(self) -> None:
        super().__init__()
        self.kicks: list[int] = []
        self.chains: list[q.Chain] = []
        self.resets = 0

    def config(self) -> bytes:
        return bytes(range(1, 13))

    def notify(self, queue: int) -> None:
        self.kicks.append(queue)
        transport = self.transport
        if transport is None:
            return
        vq = transport.queues[queue]
        while (chain := self.pop(vq)) is not None:
            self.chains.append(chain)
            vq.push(chain.head, chain.writable_len)
        transport.used(queue)

    def reset(self) -> None:
        self.resets += 1
        super().reset()


@pytest.fixture
def null():
    drv = GuestDriver(NullBackend())
    yield drv
    drv.close()


@pytest.fixture(autouse=True)
def no_backend_crash(caplog):
    """No exception may escape a backend thread (they log 'internal error')."""
    caplog.set_level(logging.WARNING, logger="pyvmm.virtio")
    yield
    crashes = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert not crashes, crashes[0].getMessage()


# --- registers and negotiation ---------------------------------------------------------


def test_identification_registers(null):
    assert null.rd(m.MAGIC_VALUE) == 0x74726976
    assert null.rd(m.VERSION_REG) == 2
    assert null.rd(m.DEVICE_ID) == 0x42
    assert null.rd(m.VENDOR_ID_REG) == m.VENDOR_ID
    null.wr(m.QUEUE_SEL, 1)
    assert null.rd(m.QUEUE_NUM_MAX) == 16
    null.wr(m.QUEUE_SEL, 2)
    assert null.rd(m.QUEUE_NUM_MAX) == 0  # no such queue
    assert null.rd(m.QUEUE_READY) == 0


def test_device_features_are_offered_by_word(null):
    features = null.device_features()
    assert features == NullBackend.features
    assert features & VIRTIO_F_VERSION_1
    null.wr(m.DEVICE_FEATURES_SEL, 7)
    assert null.rd(m.DEVICE_FEATURES) == 0


def test_features_ok_needs_version_1(null):
    assert not null.negotiate(1 << 3)
    assert not null.rd(m.STATUS) & m.STATUS_FEATURES_OK


def test_features_ok_refuses_features_not_offered(null):
    assert not null.negotiate(VIRTIO_F_VERSION_1 | 1 << 5)


def test_features_ok_accepts_a_subset_and_freezes_them(null):
    assert null.negotiate(VIRTIO_F_VERSION_1)
    assert null.transport.driver_features == VIRTIO_F_VERSION_1
    null.wr(m.DRIVER_FEATURES_SEL, 0)
    null.wr(m.DRIVER_FEATURES, 1 << 3)  # too late: ignored
    assert null.transport.driver_features == VIRTIO_F_VERSION_1


def test_driver_ok_without_features_ok_needs_reset(null):
    null.wr(m.STATUS, m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER)
    null.wr(m.STATUS, m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER | m.STATUS_DRIVER_OK)
    assert null.needs_reset()
    assert null.backend.transport is None


def test_status_bits_are_never_cleared_except_by_reset(null):
    null.wr(m.STATUS, m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER)
    null.wr(m.STATUS, m.STATUS_ACKNOWLEDGE)
    assert null.rd(m.STATUS) == m.STATUS_ACKNOWLEDGE | m.STATUS_DRIVER


def test_reset_clears_queues_features_and_interrupts(null):
    vq0, _ = null.start()
    vq0.post([8])
    assert null.rd(m.INTERRUPT_STATUS) == m.INT_USED_BUFFER
    null.wr(m.STATUS, 0)
    assert null.rd(m.STATUS) == 0
    assert null.rd(m.INTERRUPT_STATUS) == 0
    assert null.transport.driver_features == 0
    assert null.backend.resets >= 1 and null.backend.transport is None
    for sel in (0, 1):
        null.wr(m.QUEUE_SEL, sel)
        assert null.rd(m.QUEUE_READY) == 0
    kicks = len(null.backend.kicks)
    null.transport.notify(0)  # not live any more: ignored
    assert len(null.backend.kicks) == kicks
    null.start()  # and the device can be brought up again
    head = null.queues[1].post([b"x", 4])
    assert null.queues[1].wait_used() == [(head, 4)]


def test_failed_status_stops_the_backend(null):
    null.start()
    null.wr(m.STATUS, null.rd(m.STATUS) | m.STATUS_FAILED)
    assert null.backend.transport is None


def test_register_accesses_must_be_32_bit(null):
    assert null.rd(m.MAGIC_VALUE, 2) == 0
    null.wr(m.STATUS, m.STATUS_ACKNOWLEDGE, 1)
    assert null.rd(m.STATUS) == 0


def test_config_space_any_width(null):
    assert null.rd(m.CONFIG, 1) == 1
    assert null.rd(m.CONFIG + 1, 2) == 0x0302
    assert null.rd(m.CONFIG + 4, 8) == int.from_bytes(bytes(range(5, 13)), "little")
    assert null.rd(m.CONFIG + 10, 4) == 0x0C0B  # past the end reads zero
    assert null.rd(m.CONFIG + 0x200, 4) == 0


def test_config_generation_and_interrupt(null):
    null.start()
    gen = null.rd(m.CONFIG_GENERATION)
    null.transport.config_changed()
    assert null.rd(m.CONFIG_GENERATION) == gen + 1
    assert null.rd(m.INTERRUPT_STATUS) & m.INT_CONFIG_CHANGE
    assert null.irq.count == 1
    null.wr(m.INTERRUPT_ACK, m.INT_CONFIG_CHANGE)
    assert null.rd(m.INTERRUPT_STATUS) == 0


def test_no_shared_memory_regions(null):
    assert null.rd(m.SHM_LEN_LOW) == 0xFFFF_FFFF


# --- queues ----------------------------------------------------------------------------


def test_chain_split_into_readable_and_writable_windows(null):
    vq, _ = null.start()
    head = vq.post([b"abc", b"defg", 5, 6])
    assert vq.wait_used() == [(head, 11)]
    chain = null.backend.chains[-1]
    assert [bytes(v) for v in chain.readable] == [b"abc", b"defg"]
    assert [len(v) for v in chain.writable] == [5, 6]
    assert chain.readable_len == 7 and chain.writable_len == 11
    # zero-copy: the windows are guest RAM
    chain.writable[0][:2] = b"hi"
    assert vq.read_writable(head, 2) == b"hi"
    assert null.rd(m.INTERRUPT_STATUS) == m.INT_USED_BUFFER and null.irq.count >= 1


def test_queue_notify_register_and_notify_from_threads(null):
    _, vq1 = null.start()
    vq1.post([1], kick=False)
    vq1.post([2], kick=False)
    threads = [threading.Thread(target=null.transport.notify, args=(1,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert sorted(length for _, length in vq1.wait_used(2)) == [1, 2]
    null.wr(m.QUEUE_NOTIFY, 9)  # no such queue: ignored
    assert 9 not in null.backend.kicks


def test_indirect_descriptors(null):
    vq, _ = null.start()
    head = vq.post_indirect([b"hdr", b"payload", 32])
    assert vq.wait_used() == [(head, 32)]
    chain = null.backend.chains[-1]
    assert b"".join(bytes(v) for v in chain.readable) == b"hdrpayload"


def test_no_interrupt_flag_is_honoured(null):
    vq, _ = null.start()
    null.mem.write(vq.avail, struct.pack("<H", q.VIRTQ_AVAIL_F_NO_INTERRUPT))
    vq.post([4])
    vq.wait_used()
    assert null.irq.count == 0


def test_used_ring_wraps_past_65535(null):
    vq, _ = null.start()
    rounds = 66000 // 8  # more than 65536 chains through a size-8 queue
    for _ in range(rounds):
        for _ in range(8):
            vq.post([1], kick=False)
        vq.kick()
        assert len(vq.wait_used(8)) == 8
    assert vq.avail_idx == vq.last_used == (rounds * 8) & 0xFFFF
    assert vq.avail_idx < 66000


# --- queue set-up validation ------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("size", 6),  # not a power of two
        ("size", 32),  # above QueueNumMax (8)
        ("size", 0),
        ("desc", MEM_SIZE - 16),  # table runs past the end of RAM
        ("desc", 0x1_0000_0000_0000),  # far outside RAM
        ("desc", 0x10008),  # misaligned (16)
        ("avail", 0x20001),  # misaligned (2)
        ("used", 0x30002),  # misaligned (4)
        ("used", MEM_SIZE),
    ],
)
def test_bad_queue_configuration_is_refused(null, field, value):
    assert null.negotiate()
    null.wr(m.QUEUE_SEL, 0)
    addrs = {"desc": 0x10000, "avail": 0x20000, "used": 0x30000, "size": 8}
    addrs[field] = value
    null.wr(m.QUEUE_NUM, addrs["size"])
    for reg, key in ((m.QUEUE_DESC_LOW, "desc"), (m.QUEUE_DRIVER_LOW, "avail")):
        null.wr(reg, addrs[key] & 0xFFFF_FFFF)
        null.wr(reg + 4, addrs[key] >> 32)
    null.wr(m.QUEUE_DEVICE_LOW, addrs["used"] & 0xFFFF_FFFF)
    null.wr(m.QUEUE_DEVICE_HIGH, addrs["used"] >> 32)
    null.wr(m.QUEUE_READY, 1)
    assert null.rd(m.QUEUE_READY) == 0
    assert null.needs_reset()
    null.wr(m.STATUS, 0)
    assert not null.needs_reset()


def test_queue_config_is_frozen_while_ready(null):
    vq, _ = null.start()
    null.wr(m.QUEUE_SEL, 0)
    null.wr(m.QUEUE_DESC_LOW, 0xDEAD000)
    assert null.transport.queues[0].desc_addr == vq.desc


# --- malformed chains -------------------------------------------------------------------


def post_raw(vq: DriverQueue, descs: dict[int, tuple[int, int, int, int]], head: int) -> None:
    for slot, (addr, length, flags, nxt) in descs.items():
        vq.write_desc(slot, addr, length, flags, nxt)
    vq.publish(head)
    vq.kick()


def assert_dropped_then_working(drv: GuestDriver, vq: DriverQueue, head: int) -> None:
    assert (head, 0) in vq.wait_used()
    assert drv.transport.queues[vq.index].errors >= 1
    assert not drv.needs_reset()
    vq.free = list(range(vq.size - 1, -1, -1))
    vq.chains.clear()
    good = vq.post([b"ok", 3])
    assert vq.wait_used() == [(good, 3)]


F_NEXT, F_WRITE, F_INDIRECT = q.VIRTQ_DESC_F_NEXT, q.VIRTQ_DESC_F_WRITE, q.VIRTQ_DESC_F_INDIRECT


@pytest.mark.parametrize(
    "descs",
    [
        {0: (MEM_SIZE - 4, 8, 0, 0)},  # runs past the end of RAM
        {0: (1 << 63, 8, 0, 0)},  # far outside RAM
        {0: (0x1000, 8, F_NEXT, 1), 1: (0x2000, 8, F_NEXT, 0)},  # a loop
        {0: (0x1000, 8, F_NEXT, 0)},  # a loop onto itself
        {0: (0x1000, 8, F_WRITE | F_NEXT, 1), 1: (0x2000, 8, 0, 0)},  # read after write
        {0: (0x1000, 8, F_NEXT, 200)},  # next out of range
        {0: (0, 24 << 20, F_NEXT, 1), 1: (0, 24 << 20, F_NEXT, 2), 2: (0, 24 << 20, 0, 0)},
        {0: (0x1000, 0xFFFF_FFFF, 0, 0)},
    ],
    ids=["past-ram", "far", "loop", "self-loop", "direction", "next-range", "too-big", "4g"],
)
def test_malformed_chain_is_dropped(null, descs):
    vq, _ = null.start()
    post_raw(vq, descs, 0)
    assert_dropped_then_working(null, vq, 0)


def test_malformed_indirect_tables_are_dropped(null):
    vq, _ = null.start()
    table = null.alloc(16 * 300, 16)
    cases = [
        (table, 16 * 300),  # more descriptors than the queue size: too long
        (table, 20),  # not a multiple of 16
        (MEM_SIZE - 16, 32),  # table outside RAM
    ]
    for k in range(300):
        null.mem.write(table + 16 * k, DESC.pack(0x1000, 4, F_NEXT, k + 1))
    for addr, length in cases:
        post_raw(vq, {0: (addr, length, F_INDIRECT, 0)}, 0)
        assert_dropped_then_working(null, vq, 0)
    # an indirect table whose entries loop, and a nested indirect descriptor
    null.mem.write(table, DESC.pack(0x1000, 4, F_NEXT, 1) + DESC.pack(0x1000, 4, F_NEXT, 0))
    post_raw(vq, {0: (table, 32, F_INDIRECT, 0)}, 0)
    assert_dropped_then_working(null, vq, 0)
    null.mem.write(table, DESC.pack(table, 16, F_INDIRECT, 0))
    post_raw(vq, {0: (table, 16, F_INDIRECT, 0)}, 0)
    assert_dropped_then_working(null, vq, 0)


def test_indirect_without_the_feature_is_dropped(null):
    vq, _ = null.start(features=VIRTIO_F_VERSION_1)
    table = null.alloc(16, 16)
    null.mem.write(table, DESC.pack(0x1000, 4, 0, 0))
    post_raw(vq, {0: (table, 16, F_INDIRECT, 0)}, 0)
    assert_dropped_then_working(null, vq, 0)


def test_head_index_out_of_range_needs_reset(null):
    vq, _ = null.start()
    vq.publish(8)  # queue size is 8
    vq.kick()
    deadline = time.monotonic() + TIMEOUT
    while not null.needs_reset():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert null.rd(m.INTERRUPT_STATUS) & m.INT_CONFIG_CHANGE
    assert null.backend.transport is None
    null.start()
    assert not null.needs_reset()


def test_avail_index_running_ahead_needs_reset(null):
    vq, _ = null.start()
    null.mem.write(vq.avail + 2, struct.pack("<H", 100))
    vq.kick()
    assert null.needs_reset()
    assert vq.take_used() == []


def test_random_descriptors_never_escape(null):
    """Fuzz: random tables and avail entries give drops or NEEDS_RESET, never more."""
    import random

    rng = random.Random(1234)
    for _ in range(300):
        vq, _ = null.start()
        for slot in range(vq.size):
            addr = rng.choice([0x1000, MEM_SIZE - 8, rng.randrange(1 << 64), vq.desc])
            length = rng.choice([0, 1, 16, 4096, rng.randrange(1 << 32)])
            flags = rng.randrange(8)
            vq.write_desc(slot, addr, length, flags, rng.randrange(12))
        for _ in range(rng.randrange(1, 10)):
            vq.publish(rng.randrange(10))
        vq.kick()
        if not null.needs_reset():
            used = vq.take_used()
            assert len(used) <= 10
            assert all(length <= q.MAX_CHAIN_BYTES for _, length in used)


def test_dma_window_confines_rings_and_buffers(null):
    half = MEM_SIZE // 2
    null.transport.set_dma_window(half, half)
    null.negotiate()
    null.setup_queue(0, 8)  # the driver's arena is in the low half
    assert null.rd(m.QUEUE_READY) == 0 and null.needs_reset()
    null._next = half + ARENA  # rings and buffers in the window
    vq, _ = null.start()
    assert not null.needs_reset()
    head = vq.post([b"in", 2])
    assert vq.wait_used() == [(head, 2)]
    post_raw(vq, {0: (0x1000, 8, 0, 0)}, 0)  # a buffer outside the window
    assert_dropped_then_working(null, vq, 0)
    with pytest.raises(MemoryAccessError):
        null.transport.set_dma_window(half, MEM_SIZE)


def test_device_can_ask_for_no_kicks_and_sees_what_came_without_one(null):
    vq, _ = null.start()
    queue = null.transport.queues[0]
    flags = lambda: struct.unpack("<H", null.mem.read(vq.used, 2))[0]  # noqa: E731
    assert not queue.notifications(False) and flags() == q.VIRTQ_USED_F_NO_NOTIFY
    assert not queue.notifications(True) and flags() == 0  # nothing was added meanwhile
    queue.notifications(False)
    vq.post([4], kick=False)  # the driver honours the hint
    assert queue.notifications(True) and flags() == 0  # the device must look again
    queue.disable()
    null.mem.write(vq.used, struct.pack("<H", 7))
    assert not queue.notifications(False) and flags() == 7  # no ring, no write
