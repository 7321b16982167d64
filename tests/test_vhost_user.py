"""The vhost-user protocol module over a socketpair: the VMM's FrontEnd configures a
BackEnd served on a thread, with guest RAM as a memfd and eventfds for the rings."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from pyvmm.backends import vhost_user as vu
from pyvmm.memory import MEMFD_4K, GuestMemory

MiB = 1 << 20
QUEUES = 2
DEVICE_FEATURES = (1 << 32) | (1 << 9)  # VERSION_1, a device bit


class Pair:
    """A front-end and a back-end serving on a thread until the socket closes."""

    def __init__(self, protocol_features: int = vu.PROTOCOL_F_REPLY_ACK) -> None:
        vmm, device = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.front = vu.FrontEnd(vmm, timeout=2.0)
        self.back = vu.BackEnd(device, DEVICE_FEATURES, QUEUES, protocol_features)
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                self.back.serve_one(timeout=30)
            except vu.VhostUserError as exc:
                self.errors.append(exc)
                self.back.sock.close()
                self.back.reset()
                return

    def close(self) -> None:
        self.front.sock.close()
        self.thread.join(5)


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


@pytest.fixture
def ram():
    with GuestMemory(4 * MiB, backing=MEMFD_4K) as mem:
        yield mem


def region(ram: GuestMemory) -> vu.MemoryRegion:
    return vu.MemoryRegion(0, ram.size, ram.host_address, 0)


def ring_at(ram: GuestMemory, index: int, gpa: int) -> vu.VringAddr:
    """A 256-entry split ring at gpa, in the front-end's virtual addresses."""
    base = ram.host_address + gpa
    return vu.VringAddr(index, 0, desc=base, avail=base + 0x1000, used=base + 0x2000)


def configure(pair: Pair, ram: GuestMemory) -> int:
    features = pair.front.negotiate(DEVICE_FEATURES)
    pair.front.set_mem_table([region(ram)], [ram.fd])
    pair.front.set_vring_num(0, 256)
    pair.front.set_vring_addr(ring_at(ram, 0, 0x10000))
    pair.front.set_vring_base(0, 7)
    return features


def test_negotiation_takes_what_both_sides_have(pair):
    features = pair.front.negotiate(DEVICE_FEATURES | (1 << 5))  # a bit the device lacks
    assert features == DEVICE_FEATURES | vu.F_PROTOCOL_FEATURES
    assert pair.front.reply_ack and pair.back.protocol_features == vu.PROTOCOL_F_REPLY_ACK
    assert pair.back.owned and pair.back.features == features


def test_the_memory_table_shares_guest_ram_and_rings_translate(pair, ram):
    configure(pair, ram)
    ram.write(0x10000, b"descriptor")  # the VMM writes guest RAM ...
    ring = pair.back.vrings[0]
    assert ring.num == 256 and ring.base == 7 and not ring.started
    assert bytes(pair.back.translate(ring.addr.desc, 10)) == b"descriptor"  # ... the device sees it
    assert bytes(pair.back.gpa(0x10000, 10)) == b"descriptor"
    pair.back.gpa(0x20000, 4)[:] = b"used"  # and the other way round
    assert ram.read(0x20000, 4) == b"used"


def test_kick_and_call_fds_start_enable_and_stop_a_ring(pair, ram):
    configure(pair, ram)
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        pair.front.set_vring_call(0, call)
        pair.front.set_vring_kick(0, kick)
        ring = pair.back.vrings[0]
        assert ring.started and not ring.enabled  # protocol features: enabled separately
        pair.front.set_vring_enable(0, True)
        assert ring.enabled
        os.eventfd_write(kick, 1)  # KVM's ioeventfd would do this
        assert os.eventfd_read(ring.kick) == 1  # the back-end's own copy of the fd
        os.eventfd_write(ring.call, 1)  # the back-end raises the interrupt
        assert os.eventfd_read(call) == 1
        ring.base = 42  # the device took 35 more buffers
        assert pair.front.get_vring_base(0) == 42
        assert not ring.started and ring.kick == ring.call == -1
    finally:
        os.close(kick)
        os.close(call)


def test_without_reply_ack_a_kick_enables_the_ring():
    p = Pair(protocol_features=0)
    try:
        p.front.set_owner()
        p.front.set_features(DEVICE_FEATURES)  # no F_PROTOCOL_FEATURES
        with GuestMemory(4 * MiB, backing=MEMFD_4K) as ram:
            p.front.set_mem_table([region(ram)], [ram.fd])
            p.front.set_vring_num(1, 64)
            p.front.set_vring_addr(ring_at(ram, 1, 0x40000))
            p.front.set_vring_kick(1, None)  # polling, no fd
            p.front.get_features()  # a round trip: everything before it was handled
            assert p.back.vrings[1].started and p.back.vrings[1].enabled
    finally:
        p.close()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f, ram: f.set_vring_num(5, 256), "ring 5 does not exist"),
        (lambda f, ram: f.set_vring_num(0, 100), "power of two"),
        (lambda f, ram: f.set_vring_addr(ring_at(ram, 0, 4 * MiB - 0x1000)), "no memory region"),
        (lambda f, ram: f.set_vring_addr(vu.VringAddr(0, 0, 1, 2, 3)), "aligned"),
        (lambda f, ram: f.set_vring_base(0, 70000), "base"),
        (lambda f, ram: f.set_features(1 << 5), "features 0x20 were not offered"),
        (lambda f, ram: f.set_protocol_features(1 << 60), "protocol features 0x1000"),
        (lambda f, ram: f.set_mem_table([vu.MemoryRegion(0, 4 * MiB, 0, 123)], [ram.fd]), "page"),
        (lambda f, ram: f.set_mem_table([vu.MemoryRegion(0, 64 * MiB, 0, 0)], [ram.fd]), "map"),
    ],
)
def test_bad_values_are_refused_and_the_connection_goes_on(pair, ram, call, message):
    configure(pair, ram)
    with pytest.raises(vu.RequestRefused):
        call(pair.front, ram)
    assert pair.front.get_vring_base(0) == 7  # still serving, state unchanged
    assert pair.back.vrings[0].num == 256 and not pair.errors
    assert pair.back.refused == 1 and message in pair.back.last_refusal  # not sent: logged


def test_requests_before_set_owner_are_refused(pair):
    vu.send_message(pair.front.sock, vu.Request.SET_VRING_NUM, 0, struct.pack("<II", 0, 8))
    pair.thread.join(5)
    assert "before SET_OWNER" in str(pair.errors[0])


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (struct.pack("<III", 3, 0x2, 0), "version"),
        (struct.pack("<III", 5, 0x1, 1 << 20), "payload of"),
        (struct.pack("<III", 8, 0x1, 8) + b"\0\0", "closed in the middle"),
    ],
)
def test_malformed_messages_end_the_connection(pair, raw, reason):
    pair.front.sock.sendall(raw)
    if reason == "closed in the middle":
        pair.front.sock.shutdown(socket.SHUT_WR)
    pair.thread.join(5)
    assert not pair.thread.is_alive() and reason in str(pair.errors[0])


def test_a_hung_back_end_times_out_the_front_end():
    vmm, device = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front = vu.FrontEnd(vmm, timeout=0.2)
    try:
        began = time.monotonic()
        with pytest.raises(vu.VhostUserTimeout):
            front.get_features()  # nobody answers
        assert time.monotonic() - began < 1.0
    finally:
        vmm.close()
        device.close()


def test_too_many_fds_are_refused_and_closed(pair):
    fds = [os.eventfd(0) for _ in range(vu.MAX_FDS + 2)]
    try:
        vu.send_message(pair.front.sock, vu.Request.SET_VRING_KICK, 0, struct.pack("<Q", 0), fds)
        pair.thread.join(5)
        assert "fds" in str(pair.errors[0])
    finally:
        for fd in fds:
            os.close(fd)


ECHO_BACK_END = """
import os, select, socket, sys
from pyvmm.backends import vhost_user as vu

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
back = vu.BackEnd(sock, 1 << 32, 1)
while True:
    ring = back.vrings[0]
    watched = [sock] + ([ring.kick] if ring.started and ring.enabled else [])
    ready = select.select(watched, [], [], 30)[0]
    if not ready:
        sys.exit("idle for 30 s")
    if sock in ready:
        try:
            back.serve_one()
        except vu.ProtocolError:
            sys.exit(0)  # the VMM closed the connection
        continue
    os.eventfd_read(ring.kick)
    request = bytes(back.gpa(0x1000, 4))  # a device reading guest RAM ...
    back.gpa(0x2000, 4)[:] = request[::-1]  # ... and writing it
    os.eventfd_write(ring.call, 1)  # the interrupt
"""


def test_a_back_end_process_maps_guest_ram_and_answers_through_eventfds(ram, tmp_path):
    """Guest RAM shared with another process: the memfd and the eventfds cross
    the socket, the process reads and writes guest RAM, the VMM sees it."""
    path = str(tmp_path / "backend.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    child = subprocess.Popen([sys.executable, "-c", ECHO_BACK_END, path])
    kick, call = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()
        front = vu.FrontEnd(conn, timeout=10)
        front.negotiate(1 << 32)
        front.set_mem_table([region(ram)], [ram.fd])
        front.set_vring_num(0, 256)
        front.set_vring_addr(ring_at(ram, 0, 0x10000))
        front.set_vring_call(0, call)
        front.set_vring_kick(0, kick)
        front.set_vring_enable(0, True)
        ram.write(0x1000, b"ping")
        os.eventfd_write(kick, 1)
        assert select.select([call], [], [], 10)[0], "no interrupt from the back-end"
        assert os.eventfd_read(call) == 1
        assert ram.read(0x2000, 4) == b"gnip"
        conn.close()
        assert child.wait(10) == 0
    finally:
        child.kill()
        child.wait()
        listener.close()
        os.close(kick)
        os.close(call)
