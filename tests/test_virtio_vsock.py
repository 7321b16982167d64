"""virtio-vsock and the TCP port forwarder: real TCP clients on 127.0.0.1 against a
Python guest (the test driver) speaking the vsock protocol from the guest side.

Every test runs twice (the ``nodes`` fixture): with the device model in this process
("thread") and served by the vsock back-end process through vhost-user and its control
channel ("process", ``pyvmm.backends.vsock``), guest RAM then a memfd it maps, kicks
and interrupts eventfds. What a test reads of the device's state comes from the model
itself with "thread" and from the back-end's status with "process" (``streams``,
``parked`` and the other helpers below)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time
from collections import deque

import pytest
from test_virtio_driver import MEM_SIZE, TIMEOUT, GuestDriver, no_backend_crash  # noqa: F401

from pyvmm.backends.vsock_front import ProcessVsock, RemoteListener, VsockProcess
from pyvmm.devices.virtio import mmio as m
from pyvmm.devices.virtio import queue as q
from pyvmm.devices.virtio import vsock as v
from pyvmm.devices.virtio.forward import HostListener
from pyvmm.devices.virtio.vsock_conn import ESTABLISHED
from pyvmm.memory import MEMFD_4K, GuestMemory

GUEST_CID = 3
PORT = 1234
RX_BUF = 4096 + v.HDR.size


class GConn:
    """The guest's end of one stream."""

    def __init__(self, host_port: int, guest_port: int, mode: str) -> None:
        self.host_port = host_port
        self.guest_port = guest_port
        self.mode = mode
        self.rx = bytearray()  # received, not yet consumed by the guest "application"
        self.received = hashlib.sha256()
        self.received_len = 0
        self.out = bytearray()  # to send to the host
        self.fwd_cnt = 0
        self.adv_fwd_cnt = 0
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.peer_shut_send = False
        self.shutdown_sent = False
        self.reset = False  # RST received
        self.violations = 0  # data beyond the credit we gave
        self.max_in_flight = 0  # most bytes we had outstanding towards the host

    def credit(self) -> int:
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)


class GuestVsock:
    """A guest vsock driver on its own thread: listens, echoes, sinks or sources."""

    def __init__(
        self,
        drv: GuestDriver,
        buf_alloc: int = 256 << 10,
        rx_buffers: int = 64,
        consume_per_tick: int = 1 << 30,
        tick: float = 0.0,
        listening: dict[int, str] | None = None,
    ) -> None:
        self.drv = drv
        self.buf_alloc = buf_alloc
        self.consume_per_tick = consume_per_tick
        self.tick = tick
        # port → mode: "echo", "sink", "source", "handback" (sends source_data, then
        # hands the stream back) or "mute" (never answers a REQUEST)
        self.listening: dict[int, str] = dict(listening or {})
        self.source_data = b""
        self.conns: dict[tuple[int, int], GConn] = {}
        self.closed: list[GConn] = []
        self.resets_seen: list[tuple[int, int]] = []
        self.packets: list[tuple[int, int, int]] = []  # (op, flags, len) in arrival order
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self._backlog: deque[bytes] = deque()
        self.rxq, self.txq, self.evq = drv.start(buf_size=RX_BUF)
        for _ in range(rx_buffers):
            self.rxq.post([RX_BUF], kick=False)
        for _ in range(4):
            self.evq.post([4], kick=False)
        self.rxq.kick()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        self.thread.join(TIMEOUT)

    # --- sending -------------------------------------------------------------------

    def send(self, conn_or_ports, op: int, flags: int = 0, payload: bytes = b"", **over) -> None:
        if isinstance(conn_or_ports, GConn):
            host_port, guest_port, fwd = (*self._ports(conn_or_ports), conn_or_ports.fwd_cnt)
            conn_or_ports.adv_fwd_cnt = fwd
        else:
            (host_port, guest_port), fwd = conn_or_ports, 0
        fields = {
            "src_cid": GUEST_CID,
            "dst_cid": v.HOST_CID,
            "src_port": guest_port,
            "dst_port": host_port,
            "len": len(payload),
            "type": v.TYPE_STREAM,
            "op": op,
            "flags": flags,
            "buf_alloc": self.buf_alloc,
            "fwd_cnt": fwd,
        }
        fields.update(over)
        self._backlog.append(v.HDR.pack(*fields.values()) + payload)

    @staticmethod
    def _ports(conn: GConn) -> tuple[int, int]:
        return conn.host_port, conn.guest_port

    def _flush_backlog(self) -> None:
        sent = False
        while self._backlog and self.txq.free:
            self.txq.post([self._backlog.popleft()], kick=False)
            sent = True
        if sent:
            self.txq.kick()

    # --- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            self.drv.irq.event.wait(0.005)
            self.drv.irq.event.clear()
            with self.lock:
                self.txq.take_used()
                self._receive()
                self._applications()
                self._flush_backlog()
            if self.tick:
                time.sleep(self.tick)

    def _receive(self) -> None:
        used = self.rxq.take_used()
        # Every packet is read before a buffer is posted again: a posted buffer may
        # reuse the slot of a packet not read yet, and a device in another process
        # fills it at once.
        packets = [self.rxq.read_writable(head, length) if length else b"" for head, length in used]
        for data in packets:
            if len(data) >= v.HDR.size:
                self._packet(data)
            self.rxq.post([RX_BUF], kick=False)
        if used:
            self.rxq.kick()

    def _packet(self, data: bytes) -> None:
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf, fwd = v.HDR.unpack(
            data[: v.HDR.size]
        )
        payload = data[v.HDR.size : v.HDR.size + length]
        self.packets.append((op, flags, length))
        if (src_cid, dst_cid, kind) != (v.HOST_CID, GUEST_CID, v.TYPE_STREAM):
            self.errors.append(f"bad header {src_cid} {dst_cid} {kind}")
        if len(payload) != length:
            self.errors.append("truncated packet")
        key = (src_port, dst_port)
        conn = self.conns.get(key)
        if op == v.OP_REQUEST:
            mode = self.listening.get(dst_port)
            if mode is None:
                self.send(key, v.OP_RST)
                return
            if mode == "mute":
                return
            conn = self.conns[key] = GConn(src_port, dst_port, mode)
            conn.peer_buf_alloc, conn.peer_fwd_cnt = buf, fwd
            if mode in ("source", "handback"):
                conn.out += self.source_data
            self.send(conn, v.OP_RESPONSE)
            return
        if op == v.OP_RST:
            self.resets_seen.append(key)
            if conn is not None:
                conn.reset = True
                self.closed.append(self.conns.pop(key))
            return
        if conn is None:
            if op != v.OP_RST:
                self.errors.append(f"op {op} for unknown stream {key}")
            return
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf, fwd
        if op == v.OP_RW:
            if len(conn.rx) + length > self.buf_alloc:
                conn.violations += 1
            conn.rx += payload
        elif op == v.OP_SHUTDOWN:
            conn.peer_shut_send |= bool(flags & v.SHUTDOWN_SEND)
        elif op == v.OP_CREDIT_REQUEST:
            self.send(conn, v.OP_CREDIT_UPDATE)

    def _applications(self) -> None:
        for conn in list(self.conns.values()):
            # consume what arrived, as a (possibly slow) application would
            if conn.mode == "echo":
                room = max(0, (256 << 10) - len(conn.out))
                take = min(len(conn.rx), self.consume_per_tick, room)
                conn.out += conn.rx[:take]
            else:
                take = min(len(conn.rx), self.consume_per_tick)
                conn.received.update(conn.rx[:take])
                conn.received_len += take
            del conn.rx[:take]
            conn.fwd_cnt += take
            # send within the host's credit
            while conn.out and conn.credit() > 0 and len(self._backlog) < 64:
                n = min(len(conn.out), conn.credit(), 4096)
                self.send(conn, v.OP_RW, payload=bytes(conn.out[:n]))
                del conn.out[:n]
                conn.tx_cnt += n
                conn.max_in_flight = max(conn.max_in_flight, conn.tx_cnt - conn.peer_fwd_cnt)
            if conn.fwd_cnt - conn.adv_fwd_cnt >= self.buf_alloc // 4:
                self.send(conn, v.OP_CREDIT_UPDATE)
            # close like Linux: SHUTDOWN(both) when done, then wait for the host's RST
            done = conn.peer_shut_send and not conn.rx and not conn.out
            if conn.mode in ("source", "handback"):
                done = not conn.out
            if done and not conn.shutdown_sent:
                conn.shutdown_sent = True
                both = v.SHUTDOWN_SEND | v.SHUTDOWN_RCV
                self.send(conn, v.OP_SHUTDOWN, v.SHUTDOWN_RCV if conn.mode == "handback" else both)

    def wait(self, predicate, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if predicate():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("guest condition not reached")
            time.sleep(0.005)


class EventfdIrq:
    """An interrupt line as an eventfd (as the machine's irqfd is), which the back-end
    process signals; a thread turns it into the event the guest's loop waits on."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.count = 0
        self.event = threading.Event()
        self._closed = False
        threading.Thread(target=self._watch, daemon=True).start()

    def trigger(self) -> None:
        os.eventfd_write(self.fd, 1)

    def _watch(self) -> None:
        while not self._closed:
            self.count += os.eventfd_read(self.fd)
            self.event.set()

    def close(self) -> None:
        self._closed = True
        os.eventfd_write(self.fd, 1)  # the watcher's last read; the fd goes with the process


class Node:
    """A vsock device, its transport and a guest, torn down safely. With a
    ``VsockProcess``, the device is that process's front-end of ``partition``."""

    def __init__(self, process: VsockProcess | None = None, partition: int = 0, **kw) -> None:
        dev_kw = {
            k: kw.pop(k) for k in ("buf_alloc", "connect_timeout", "max_connections") if k in kw
        }
        if process is None:
            self.device = v.VirtioVsock(GUEST_CID, **dev_kw)
            self.drv = GuestDriver(self.device)
        else:
            mem = GuestMemory(MEM_SIZE, backing=MEMFD_4K)
            name = f"vsock{partition}"
            self.device = ProcessVsock(
                process, mem, (0, MEM_SIZE), GUEST_CID, name, partition, **dev_kw
            )
            irq = EventfdIrq()
            self.drv = GuestDriver(
                self.device, mem, m.VirtioMmioTransport(mem, self.device, irq, name)
            )
            self.drv.irq = irq
        self.guest: GuestVsock | None = None
        self.guest_kw = kw

    def boot(self) -> GuestVsock:
        self.guest = GuestVsock(self.drv, **self.guest_kw)
        return self.guest

    def close(self) -> None:
        if self.guest is not None:
            self.guest.stop()
        self.drv.close()
        if isinstance(self.device, ProcessVsock):
            self.drv.irq.close()


@pytest.fixture(params=["thread", "process"])
def nodes(request):
    """``nodes(**kw)`` makes a Node; with "process" every Node of the test is a front-end
    of one back-end process, as on a node (so listeners move between them)."""
    made: list[Node] = []
    listeners: list[HostListener | RemoteListener] = []
    process = VsockProcess("vsock-test") if request.param == "process" else None

    def make(**kw) -> Node:
        made.append(Node(process, len(made), **kw))
        return made[-1]

    make.listeners = listeners
    make.backends = request.param
    yield make
    for listener in listeners:
        listener.close()
    for node in made:
        node.close()
    if process is not None:
        process.close()


def listen(nodes, device, guest_port=PORT, **kw) -> HostListener | RemoteListener:
    listener = device.forward("127.0.0.1", 0, guest_port, **kw)
    nodes.listeners.append(listener)
    return listener


def parked(listener: HostListener | RemoteListener) -> int:
    """Connections waiting in the listener for a guest."""
    if isinstance(listener, RemoteListener):
        return listener.status()["parked"]
    return len(listener.pending)


def replay_bytes(listener: HostListener | RemoteListener) -> list[int]:
    """Per parked connection, the bytes the next guest will be given first (sorted)."""
    if isinstance(listener, RemoteListener):
        return sorted(listener.status()["replay_bytes"])
    return sorted(len(p.replay) for p in listener.pending)


def unanswered(device: v.VirtioVsock | ProcessVsock) -> list[int]:
    """Per stream, the bytes the guest consumed and did not answer yet."""
    if isinstance(device, ProcessVsock):
        return device.counts()["unanswered"]
    return [len(c.unanswered) for c in host_conns(device)]


def streams(device: v.VirtioVsock | ProcessVsock) -> list[dict]:
    """Per stream: state, rx_cnt, fwd_cnt (guest → host bytes received, forwarded)."""
    if isinstance(device, ProcessVsock):
        return device.counts()["streams"]
    with device._lock:
        return [
            {"state": c.state, "rx_cnt": c.rx_cnt, "fwd_cnt": c.fwd_cnt}
            for c in device._conns.values()
        ]


def reply_bytes(listener: HostListener | RemoteListener) -> list[int]:
    """Per parked connection, the guest's bytes still to be written to the client."""
    if isinstance(listener, RemoteListener):
        return listener.status()["reply_bytes"]
    return [len(p.reply) for p in listener.pending]


def pending_replies(device: v.VirtioVsock | ProcessVsock) -> int:
    """Control packets (RST to unknown streams) waiting for rx buffers."""
    if isinstance(device, ProcessVsock):
        return device.counts()["pending_replies"]
    with device._lock:
        return len(device._control)


def queue_errors(node: Node, queue: int) -> int:
    """Malformed chains the device dropped on ``queue``."""
    if isinstance(node.device, ProcessVsock):
        return node.device.counts()["queue_errors"][queue]
    return node.drv.transport.queues[queue].errors


def client(listener: HostListener | RemoteListener) -> socket.socket:
    sock = socket.create_connection(listener.address, timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 16))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def until(predicate, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


# --- device basics ---------------------------------------------------------------------


def test_identity_config_and_features(nodes):
    node = nodes()
    drv = node.drv
    assert drv.rd(m.DEVICE_ID) == 19
    assert drv.rd(m.CONFIG, 8) == GUEST_CID
    assert drv.device_features() == 1 << 32  # VERSION_1 only: no indirect, no event idx
    for sel in range(3):
        drv.wr(m.QUEUE_SEL, sel)
        assert drv.rd(m.QUEUE_NUM_MAX) == v.QUEUE_SIZE
    drv.wr(m.QUEUE_SEL, 3)
    assert drv.rd(m.QUEUE_NUM_MAX) == 0
    with pytest.raises(ValueError):
        v.VirtioVsock(2)


# --- streams ---------------------------------------------------------------------------


def test_echo_and_clean_close(nodes):
    node = nodes()
    guest = node.boot()
    guest.listening[PORT] = "echo"
    listener = listen(nodes, node.device)
    sock = client(listener)
    sock.sendall(b"hello, guest")
    assert recv_exactly(sock, 12) == b"hello, guest"
    sock.sendall(b"again")
    assert recv_exactly(sock, 5) == b"again"
    sock.shutdown(socket.SHUT_WR)  # TCP close → SHUTDOWN to the guest
    assert sock.recv(10) == b""  # guest SHUTDOWN → our EOF
    guest.wait(lambda: len(guest.closed) == 1)  # and the host's RST finished it
    conn = guest.closed[0]
    assert conn.peer_shut_send and conn.reset
    ops = [op for op, _, _ in guest.packets]
    assert ops.index(v.OP_SHUTDOWN) > max(i for i, op in enumerate(ops) if op == v.OP_RW)
    until(lambda: node.device.connections == 0)
    sock.close()
    assert not guest.errors and conn.violations == 0


def test_guest_data_before_client_close_is_delivered(nodes):
    node = nodes()
    guest = node.boot()
    guest.listening[PORT] = "source"
    guest.source_data = os.urandom(100_000)
    sock = client(listen(nodes, node.device))
    assert recv_exactly(sock, 100_001) == guest.source_data  # then EOF
    assert sock.recv(1) == b""


@pytest.mark.parametrize("direction", ["echo", "to-guest", "from-guest"])
def test_4mib_through_small_credit_windows(nodes, direction):
    """4 MiB with 16 KiB of credit each way: nothing lost, credit never exceeded."""
    node = nodes(buf_alloc=16 << 10)  # the host's window
    node.guest_kw = {"buf_alloc": 16 << 10, "rx_buffers": 16}  # the guest's
    guest = node.boot()
    data = os.urandom(4 << 20)
    guest.listening[PORT] = {"echo": "echo", "to-guest": "sink", "from-guest": "source"}[direction]
    guest.source_data = data
    sock = client(listen(nodes, node.device))
    if direction != "from-guest":
        sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(1)))
        sender.start()
    if direction == "to-guest":
        guest.wait(
            lambda: guest.closed or any(c.received_len == len(data) for c in guest.conns.values()),
            60,
        )
        conn = (guest.closed or list(guest.conns.values()))[0]
        assert conn.received.digest() == hashlib.sha256(data).digest()
    else:
        got = recv_exactly(sock, len(data))
        assert got == data
    if direction != "from-guest":
        sender.join(TIMEOUT)
    for conn in [*guest.conns.values(), *guest.closed]:
        assert conn.violations == 0
        assert conn.max_in_flight <= 16 << 10
    assert not guest.errors
    assert node.device.dropped == 0
    sock.close()


def test_slow_client_back_pressures_the_guest(nodes):
    node = nodes(buf_alloc=32 << 10)
    guest = node.boot()
    guest.listening[PORT] = "source"
    data = os.urandom(8 << 20)
    guest.source_data = data
    sock = client(listen(nodes, node.device))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    guest.wait(lambda: guest.conns)  # connected (a loaded machine may take a while)
    time.sleep(0.5)  # not reading: kernel buffers fill, then our buffer, then credit
    with guest.lock:
        (conn,) = guest.conns.values()
        stalled_at = conn.tx_cnt
        assert conn.out  # the guest is held back
        assert conn.tx_cnt - conn.peer_fwd_cnt <= 32 << 10
    assert stalled_at < len(data) // 2
    assert recv_exactly(sock, len(data)) == data
    assert conn.max_in_flight <= 32 << 10


def test_slow_guest_back_pressures_the_client(nodes):
    node = nodes()
    node.guest_kw = {"buf_alloc": 32 << 10, "consume_per_tick": 4096, "tick": 0.002}
    guest = node.boot()
    guest.listening[PORT] = "sink"
    data = os.urandom(4 << 20)
    sock = client(listen(nodes, node.device))
    sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
    sender.start()
    time.sleep(0.5)
    assert sender.is_alive()  # the client is blocked by the guest's credit
    guest.consume_per_tick = 1 << 30
    guest.tick = 0
    sender.join(60)
    assert not sender.is_alive()
    sock.shutdown(socket.SHUT_WR)
    guest.wait(lambda: guest.closed and guest.closed[0].received_len == len(data), 60)
    conn = guest.closed[0]
    assert conn.received.digest() == hashlib.sha256(data).digest()
    assert conn.violations == 0


def test_fifty_concurrent_connections(nodes):
    node = nodes(buf_alloc=64 << 10)
    guest = node.boot()
    guest.listening[PORT] = "echo"
    listener = listen(nodes, node.device)
    results: dict[int, bool] = {}

    def one(i: int) -> None:
        payload = os.urandom(32 << 10) + i.to_bytes(4, "little")
        with client(listener) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            results[i] = recv_exactly(sock, len(payload)) == payload
            sender.join(TIMEOUT)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == dict.fromkeys(range(50), True)
    until(lambda: node.device.connections == 0)
    assert not guest.errors


def test_refused_connection_closes_the_client(nodes):
    node = nodes()
    guest = node.boot()  # not listening on PORT
    with pytest.raises(ConnectionResetError):  # as close to "refused" as TCP gets now
        sock = client(listen(nodes, node.device))  # (the reset may beat connect's return)
        sock.recv(10)
    until(lambda: node.device.connections == 0)
    assert guest.resets_seen == []  # the guest sent the RST; the host does not answer it


def test_guest_reset_closes_the_client(nodes):
    node = nodes()
    guest = node.boot()
    guest.listening[PORT] = "echo"
    sock = client(listen(nodes, node.device))
    sock.sendall(b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    with guest.lock:
        (conn,) = guest.conns.values()
        guest.send(conn, v.OP_RST)
        guest._flush_backlog()
    with pytest.raises(ConnectionResetError):  # an abort: the client must not see EOF
        sock.recv(10)
    until(lambda: node.device.connections == 0)


def test_guest_close_after_shutdown_delivers_everything(nodes):
    node = nodes()
    guest = node.boot()
    guest.listening[PORT] = "echo"
    sock = client(listen(nodes, node.device))
    sock.sendall(b"ping")
    assert recv_exactly(sock, 4) == b"ping"
    with guest.lock:
        (conn,) = guest.conns.values()
        guest.send(conn, v.OP_RW, payload=b"last words!")
        guest.send(conn, v.OP_SHUTDOWN, v.SHUTDOWN_SEND | v.SHUTDOWN_RCV)
        guest.send(conn, v.OP_RST)
        conn.shutdown_sent = True
        guest._flush_backlog()
    assert recv_exactly(sock, 11) == b"last words!"
    assert sock.recv(10) == b""
    until(lambda: node.device.connections == 0)


def test_client_reset_resets_the_guest_stream(nodes):
    node = nodes()
    guest = node.boot()
    guest.listening[PORT] = "echo"
    sock = client(listen(nodes, node.device))
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # TCP RST
    guest.wait(lambda: len(guest.closed) == 1)
    assert guest.closed[0].reset


def test_guest_connection_to_the_host_is_refused(nodes):
    node = nodes()
    guest = node.boot()
    with guest.lock:
        guest.send((5000, 7000), v.OP_REQUEST)
        guest._flush_backlog()
    guest.wait(lambda: (5000, 7000) in guest.resets_seen)
    assert node.device.refused == 1


def test_credit_request_is_answered(nodes):
    node = nodes()
    guest = node.boot()
    guest.listening[PORT] = "echo"
    sock = client(listen(nodes, node.device))
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    with guest.lock:
        (conn,) = guest.conns.values()
        guest.send(conn, v.OP_CREDIT_REQUEST)
        guest._flush_backlog()
    guest.wait(lambda: guest.packets[-1][0] == v.OP_CREDIT_UPDATE)
    sock.close()


# --- protocol violations and malformed buffers -----------------------------------------


def test_guest_exceeding_credit_is_reset(nodes):
    node = nodes(buf_alloc=8 << 10)
    guest = node.boot()
    guest.listening[PORT] = "source"
    guest.source_data = bytes(16 << 20)
    sock = client(listen(nodes, node.device))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)

    def stalled() -> bool:
        conns = list(guest.conns.values())
        return bool(conns) and conns[0].credit() <= 0

    guest.wait(stalled)  # the client does not read: everything is full
    time.sleep(0.2)
    with guest.lock:
        (conn,) = guest.conns.values()
        for _ in range(4):  # 16 KiB beyond an exhausted 8 KiB window
            guest.send(conn, v.OP_RW, payload=bytes(4096))
        guest._flush_backlog()
    guest.wait(lambda: len(guest.closed) == 1)
    assert guest.closed[0].reset
    until(lambda: node.device.connections == 0)
    received = 0
    try:
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass
    assert received < len(guest.source_data)  # the stream was cut, not completed


def test_malformed_tx_packets_are_dropped(nodes):
    node = nodes()
    guest = node.boot()
    guest.listening[PORT] = "echo"
    sock = client(listen(nodes, node.device))
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    with guest.lock:
        (conn,) = guest.conns.values()
        guest.send(conn, v.OP_RW, payload=b"bad", src_cid=77)  # wrong source CID
        guest.send(conn, v.OP_RW, payload=b"bad", dst_cid=5)  # not for the host
        guest.send(conn, v.OP_RW, payload=b"bad", len=5000)  # longer than its buffer
        guest._backlog.append(b"short")  # shorter than a header
        guest._flush_backlog()
    until(lambda: node.device.dropped == 4)
    sock.sendall(b"still alive")
    assert recv_exactly(sock, 11) == b"still alive"
    assert not node.drv.needs_reset()


def test_indirect_descriptor_is_refused_without_the_feature(nodes):
    node = nodes()
    guest = node.boot()
    with guest.lock:
        table = node.drv.alloc(16, 16)
        node.drv.mem.write(table, struct.pack("<QIHH", 0x1000, 44, 0, 0))
        slot = guest.txq.free.pop()
        guest.txq.write_desc(slot, table, 16, q.VIRTQ_DESC_F_INDIRECT)
        guest.txq.chains[slot] = [slot]
        guest.txq.publish(slot)
        guest.txq.kick()
    until(lambda: queue_errors(node, v.TX) == 1)
    assert not node.drv.needs_reset()


def test_tiny_rx_buffers_are_returned_empty(nodes):
    node = nodes()
    node.guest_kw = {"rx_buffers": 0}
    guest = node.boot()
    with guest.lock:
        guest.rxq.post([16])  # too small for a header
        guest.send((5000, 7000), v.OP_REQUEST)  # provoke a reply
        guest._flush_backlog()
    until(lambda: queue_errors(node, v.RX) == 1)
    with guest.lock:
        for _ in range(4):
            guest.rxq.post([RX_BUF])
    guest.wait(lambda: (5000, 7000) in guest.resets_seen)


def test_broken_tx_ring_needs_reset_and_recovers(nodes):
    node = nodes()
    guest = node.boot()
    guest.listening[PORT] = "echo"
    listener = listen(nodes, node.device)
    sock = client(listener)
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    with guest.lock:
        guest.txq.publish(999)
        guest.txq.kick()
    until(node.drv.needs_reset)
    guest.stop()
    node.drv.wr(m.STATUS, 0)  # the driver resets: streams go, the client sees EOF
    try:
        assert sock.recv(10) == b""
    except ConnectionResetError:
        pass
    assert node.device.connections == 0
    node.guest_kw = {"listening": {PORT: "echo"}}
    node.boot()
    with client(listener) as again:
        again.sendall(b"back")
        assert recv_exactly(again, 4) == b"back"


# --- the listener as a movable backend --------------------------------------------------


def test_connections_wait_until_the_driver_is_ready(nodes):
    node = nodes()
    listener = listen(nodes, node.device)  # attached before the guest drives the device
    sock = client(listener)
    sock.sendall(b"early")
    time.sleep(0.2)
    assert node.device.connections == 0  # still in the accept backlog
    node.guest_kw = {"listening": {PORT: "echo"}}
    node.boot()
    assert recv_exactly(sock, 5) == b"early"


def two_services(nodes, mode_a: str = "echo", **device_a):
    """Devices A and B with guests listening on PORT, and a listener on A."""
    a, b = nodes(**device_a), nodes()
    ga, gb = a.boot(), b.boot()
    ga.listening[PORT] = mode_a
    gb.listening[PORT] = "echo"
    return a, ga, b, gb, listen(nodes, a.device)


def test_handoff_between_devices(nodes):
    a, ga, b, gb, listener = two_services(nodes)
    old = client(listener)
    old.sendall(b"on A")
    assert recv_exactly(old, 4) == b"on A"

    listener.detach()
    waiting = client(listener)  # arrives in the gap: must wait, not be refused
    waiting.sendall(b"in the gap")
    time.sleep(0.3)
    assert b.device.connections == 0 and a.device.connections == 1

    listener.attach(b.device)
    assert recv_exactly(waiting, 10) == b"in the gap"
    old.sendall(b"still A")  # established streams stay where they were
    assert recv_exactly(old, 7) == b"still A"
    with ga.lock:
        assert len(ga.conns) == 1
    with gb.lock:
        assert len(gb.conns) == 1


def test_unanswered_requests_move_with_the_listener(nodes):
    # A receives the REQUEST but never answers.
    _, ga, b, _, listener = two_services(nodes, "mute")
    sock = client(listener)
    sock.sendall(b"moved")
    ga.wait(lambda: any(op == v.OP_REQUEST for op, _, _ in ga.packets))
    listener.detach()
    ga.wait(lambda: ga.resets_seen)  # A is told to forget the request
    assert parked(listener) == 1
    listener.attach(b.device)
    assert recv_exactly(sock, 5) == b"moved"


def test_handed_back_connection_moves_with_its_unread_request(nodes):
    a, ga, b, gb, listener = two_services(nodes)
    sock = client(listener)
    sock.sendall(b"one")
    assert recv_exactly(sock, 3) == b"one"
    with ga.lock:
        ga.consume_per_tick = 0  # A stops reading: "two" stays unconsumed in its buffer
    sock.sendall(b"two")
    ga.wait(lambda: any(c.rx == b"two" for c in ga.conns.values()))
    listener.detach()
    with ga.lock:
        (conn,) = ga.conns.values()
        conn.shutdown_sent = True
        ga.send(conn, v.OP_SHUTDOWN, v.SHUTDOWN_RCV)  # "I will read no more from this client"
    ga.wait(lambda: ga.resets_seen)  # the host ends A's stream
    assert parked(listener) == 1
    if isinstance(listener, HostListener):
        assert [p.replay for p in listener.pending] == [b"two"]
    assert a.device.connections == 0

    listener.attach(b.device)
    assert recv_exactly(sock, 3) == b"two"  # served by B, on the same client connection
    sock.sendall(b"three")
    assert recv_exactly(sock, 5) == b"three"
    with gb.lock:
        assert len(gb.conns) == 1


def test_reply_still_in_flight_is_delivered_after_a_hand_back(nodes):
    # A sends 16 MiB, then hands the stream back.
    a, ga, b, _, listener = two_services(nodes, "handback", buf_alloc=16 << 20)
    with ga.lock:
        ga.source_data = os.urandom(16 << 20)
    # The client does not read yet, and a small receive buffer (no autotuning, which
    # here may grow to 32 MiB) leaves most of the reply waiting in the host.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.settimeout(TIMEOUT)
    sock.connect(listener.address)

    def established() -> bool:
        return any(s["state"] == ESTABLISHED for s in streams(a.device))

    until(established)  # detaching earlier would give back an unanswered request
    listener.detach()
    until(lambda: parked(listener))
    assert reply_bytes(listener)[0] > 0  # carried over: A's stream is gone
    assert a.device.connections == 0
    listener.attach(b.device)
    assert hashlib.sha256(recv_exactly(sock, 16 << 20)).digest() == (
        hashlib.sha256(ga.source_data).digest()
    )
    sock.sendall(b"after")
    assert recv_exactly(sock, 5) == b"after"
    # A's bytes were not counted against B's stream (the client can have the bytes a
    # moment before the count moves)
    until(lambda: [(s["rx_cnt"], s["fwd_cnt"]) for s in streams(b.device)] == [(5, 5)])


def test_refusals_are_retried_while_the_new_service_starts(nodes):
    node = nodes()
    guest = node.boot()  # not listening yet
    listener = listen(nodes, node.device, retry_refused=5.0)
    sock = client(listener)
    sock.sendall(b"patience")
    guest.wait(lambda: sum(op == v.OP_REQUEST for op, _, _ in guest.packets) >= 2)
    with guest.lock:
        guest.listening[PORT] = "echo"
    assert recv_exactly(sock, 8) == b"patience"


def test_connect_timeout_closes_the_client(nodes):
    node = nodes(connect_timeout=0.2)
    guest = node.boot()
    guest.listening[PORT] = "mute"
    sock = client(listen(nodes, node.device))
    start = time.monotonic()
    with pytest.raises(ConnectionResetError):
        sock.recv(10)
    assert time.monotonic() - start < 5
    guest.wait(lambda: guest.resets_seen)  # the guest is told too


def test_device_reset_closes_streams_and_keeps_pending_ones(nodes):
    node = nodes()
    guest = node.boot()
    guest.listening[PORT] = "echo"
    listener = listen(nodes, node.device)
    sock = client(listener)
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    guest.stop()
    node.drv.wr(m.STATUS, 0)
    try:
        assert sock.recv(10) == b""
    except ConnectionResetError:
        pass
    later = client(listener)
    later.sendall(b"after reset")
    node.guest_kw = {"listening": {PORT: "echo"}}
    node.boot()
    assert recv_exactly(later, 11) == b"after reset"


def test_closing_a_device_leaves_the_listener_usable(nodes):
    a, b = nodes(), nodes()
    a.boot()
    gb = b.boot()
    gb.listening[PORT] = "echo"
    listener = listen(nodes, a.device)
    a.close()
    assert listener.device is None
    sock = client(listener)
    listener.attach(b.device)
    sock.sendall(b"ok")
    assert recv_exactly(sock, 2) == b"ok"


def test_connection_cap_leaves_the_rest_waiting(nodes):
    node = nodes(max_connections=2)
    node.guest_kw = {"listening": {PORT: "echo"}}
    node.boot()
    listener = listen(nodes, node.device)
    socks = [client(listener) for _ in range(4)]
    for i, sock in enumerate(socks[:2]):
        sock.sendall(b"%d" % i)
        assert recv_exactly(sock, 1) == b"%d" % i
    socks[2].sendall(b"2")
    time.sleep(0.2)
    assert node.device.connections == 2  # the others wait in the backlog
    socks[0].close()
    socks[1].close()
    assert recv_exactly(socks[2], 1) == b"2"
    socks[3].sendall(b"3")
    assert recv_exactly(socks[3], 1) == b"3"


def test_reply_flood_without_rx_buffers_is_bounded(nodes):
    node = nodes()
    node.guest_kw = {"rx_buffers": 0}  # the guest never takes the replies
    guest = node.boot()
    for burst in range(8):  # 1600 packets for streams that do not exist
        with guest.lock:
            for port in range(200):
                guest.send((5000, burst * 1000 + port), v.OP_RW, payload=b"x")
        guest.wait(lambda: not guest._backlog)
    until(lambda: pending_replies(node.device) == v.MAX_PENDING_REPLIES)
    time.sleep(0.1)
    assert pending_replies(node.device) == v.MAX_PENDING_REPLIES
    assert not node.drv.needs_reset()


# --- quiescing: the guest is gone (stopped, crashed, rolled back) ------------------------


def host_conns(device: v.VirtioVsock) -> list:
    with device._lock:
        return list(device._conns.values())


def test_quiesce_hands_every_stream_back_and_redrives_the_unanswered_request(nodes):
    a, ga, b, gb, listener = two_services(nodes)
    answered, working, unread = client(listener), client(listener), client(listener)
    for sock in (answered, working, unread):
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
    # "working": A consumes a request and says so (its fwd_cnt), but never answers it.
    ga.wait(lambda: len(ga.conns) == 3)
    with ga.lock:  # host ports are given out in accept order, the order of the clients
        _, working_guest, unread_guest = sorted(ga.conns.values(), key=lambda c: c.host_port)
    with ga.lock:
        working_guest.mode = "sink"
    working.sendall(b"GET /two")
    ga.wait(lambda: working_guest.received_len == 8)
    with ga.lock:
        ga.send(working_guest, v.OP_CREDIT_UPDATE)  # fwd_cnt now covers "GET /two"
    until(lambda: 8 in unanswered(a.device))
    # "unread": A stops reading; the request stays unconsumed in its buffer.
    with ga.lock:
        ga.consume_per_tick = 0
    unread.sendall(b"three")
    ga.wait(lambda: unread_guest.rx == b"three")
    # "waiting": accepted by the device, never answered (A has stopped); its request is
    # still in the client's socket.
    ga.stop()
    waiting = client(listener)
    waiting.sendall(b"four")
    until(lambda: a.device.connections == 4)

    assert a.drv.transport.quiesce(1.0)
    assert listener.device is None and a.device.connections == 0
    assert replay_bytes(listener) == [0, 0, len(b"three"), len(b"GET /two")]
    if isinstance(listener, HostListener):
        replays = sorted(p.replay for p in listener.pending)
        assert replays == [b"", b"", b"GET /two", b"three"]
    snapshot = a.drv.mem.read(0, a.drv.mem.size)
    answered.sendall(b"late")  # nothing reaches A's memory any more
    time.sleep(0.2)
    assert a.drv.mem.read(0, a.drv.mem.size) == snapshot

    listener.attach(b.device)  # the service goes on in B: every client is served once
    assert recv_exactly(working, 8) == b"GET /two"
    assert recv_exactly(unread, 5) == b"three"
    assert recv_exactly(waiting, 4) == b"four"
    assert recv_exactly(answered, 4) == b"late"
    gb.wait(lambda: len(gb.conns) == 4)


def test_quiesce_with_the_listener_closed_closes_the_streams(nodes):
    a, ga, _, _, listener = two_services(nodes)
    idle, busy = client(listener), client(listener)
    for sock in (idle, busy):
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
    with ga.lock:
        ga.consume_per_tick = 0
    busy.sendall(b"unread")
    ga.wait(lambda: any(c.rx == b"unread" for c in ga.conns.values()))
    ga.stop()
    assert a.drv.transport.quiesce(1.0)
    listener.close()  # the service does not go on anywhere
    assert idle.recv(10) == b""  # an idle connection ends in order
    with pytest.raises(ConnectionResetError):  # one cut short mid-exchange is reset
        busy.recv(10)


# --- the back-end process dies ------------------------------------------------------------


@pytest.mark.parametrize("nodes", ["process"], indirect=True)
def test_a_dead_back_end_is_replaced_with_its_listeners_and_counts_what_it_took(nodes):
    a, _, b, gb, listener = two_services(nodes)
    old = client(listener)
    old.sendall(b"x")
    assert recv_exactly(old, 1) == b"x"
    time.sleep(0.3)  # the back-end's counters page has seen the stream
    process = a.device.vsock_process
    os.kill(process.pid, signal.SIGKILL)
    listener.attach(b.device)  # a move while no process serves: the next one makes it
    waiting = client(listener)  # not refused: it waits in the VMM's listen queue
    waiting.sendall(b"wait")
    until(lambda: process.restarts == 1 and process.alive and not b.device.error)
    try:
        assert old.recv(10) == b""  # the stream went with the process
    except ConnectionResetError:
        pass
    assert a.device.lost_connections == 1 and b.device.lost_connections == 0
    assert a.drv.needs_reset() and b.drv.needs_reset()
    gb.stop()
    b.guest_kw = {"listening": {PORT: "echo"}}
    b.boot()  # B's driver resets the device and sets it up again, on the new process
    assert recv_exactly(waiting, 4) == b"wait"
    assert listener.status()["device"] == b.device.name
