"""virtio-vsock (virtio 1.x §5.10): stream sockets between the host (CID 2) and the
guest, carried to and from host TCP sockets.

Threading model: each device has one backend thread running an epoll loop over an
eventfd (kicks from ``notify``, attach/detach, reset), the listening sockets of the
attached ``HostListener``s and every connection's TCP socket (non-blocking). All
connection and queue state is changed under the device lock: by the loop thread
between polls, and by ``reset``/``add_listener``/``remove_listener`` from other
threads. So a reset is synchronous: when it returns, nothing of the old driver's
session touches guest memory again.

Each pass of the loop: socket events (accept, read what the guest has credit for,
write what the guest sent), then the tx queue (guest packets), then time-outs,
then the rx queue (packets for the guest: control first, then connections
round-robin), then the epoll interest sets are brought up to date.

Only host-initiated streams exist (from ``HostListener``s); a guest's REQUEST to the
host is refused with RST. A guest's SHUTDOWN of only its receive side hands the
client's connection back to its listener (see ``forward``). A guest that stops
without doing so has its streams handed back for it by ``quiesce`` (re-driving the
request it had not answered), or closed where they cannot go on. Packets from a wrong
CID or with a bad length are dropped; protocol violations (RW before RESPONSE,
sending beyond the credit we gave) reset that stream.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from collections import deque

from ._log import ERROR, log
from .backend import VIRTIO_F_VERSION_1, VirtioBackend
from .forward import HostListener
from .queue import Chain, gather, scatter
from .vsock_conn import CONNECTING, ESTABLISHED, Conn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .mmio import VirtioMmioTransport

VIRTIO_ID_VSOCK = 19
HOST_CID = 2
RX, TX, EVENT = 0, 1, 2

HDR = struct.Struct("<QQIIIHHIII")  # struct virtio_vsock_hdr, 44 bytes
TYPE_STREAM = 1
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2

QUEUE_SIZE = 256
DEFAULT_BUF_ALLOC = 256 << 10
MAX_PKT = 64 << 10  # the largest payload Linux sends or expects in one packet
FIRST_HOST_PORT = 0x4000_0000  # host-side ports of forwarded streams
MAX_CONNECTIONS = 1024
# Replies to packets for unknown streams wait for rx buffers; past this many they are
# not queued, so a guest that sends but never posts rx buffers cannot grow host memory.
MAX_PENDING_REPLIES = 1024
_MASK32 = 0xFFFF_FFFF


class VirtioVsock(VirtioBackend):
    device_id = VIRTIO_ID_VSOCK

    def __init__(
        self,
        guest_cid: int,
        buf_alloc: int = DEFAULT_BUF_ALLOC,
        queue_size: int = QUEUE_SIZE,
        connect_timeout: float = 30.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__()
        if not 3 <= guest_cid < _MASK32:
            raise ValueError(f"guest CID {guest_cid} is reserved or out of range")
        self.guest_cid = guest_cid
        self.buf_alloc = buf_alloc
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections  # more wait in the listeners' backlogs
        self.queue_sizes = (queue_size, queue_size, queue_size)
        self.features = VIRTIO_F_VERSION_1
        self.refused = 0  # guest connection requests refused
        self.dropped = 0  # malformed packets from the guest
        self.redriven = 0  # streams whose unanswered request went to the next guest
        self._conns: dict[tuple[int, int], Conn] = {}
        self._by_fd: dict[int, Conn | HostListener] = {}
        self._listeners: dict[HostListener, int] = {}  # → current epoll mask
        self._control: deque[tuple[int, int, int]] = deque()  # (host port, guest port, op)
        self._scheduled: deque[Conn] = deque()
        # Per pass, only some streams need looking at: those whose epoll interest may
        # have changed (every change ends in _after, or in the stream's removal) and
        # those with a timer or read by hand (connecting, hung up). Stale entries
        # (streams removed meanwhile) are skipped and dropped there.
        self._touched: dict[Conn, None] = {}
        self._timed: dict[Conn, None] = {}
        self._next_port = FIRST_HOST_PORT
        self._timeout = -1.0
        self._closed = False
        self._resetting = False  # see VirtioBlk.reset
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._queue_kicks: list[int] = []  # see kick_fds
        self._thread = threading.Thread(target=self._run, name="virtio-vsock", daemon=True)
        self._thread.start()

    def config(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    @property
    def connections(self) -> int:
        return len(self._conns)

    # --- transport and forwarder interface (any thread) ------------------------------

    def activate(self, transport: VirtioMmioTransport) -> None:
        with self._lock:
            self.transport = transport
        self.notify(RX)

    @property
    def kick_fds(self) -> list[int]:
        """One eventfd per queue, in this device's epoll, for the machine to assign as
        the queues' ioeventfds: a guest's kick then wakes this thread straight from
        KVM, not the machine's notify thread and then this one (a wake-up and the GIL
        each time). Made on first use; a kick is a hint like ``notify``: each pass
        looks at every queue."""
        with self._lock:
            if not self._queue_kicks and not self._closed:
                for _ in self.queue_sizes:
                    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                    self._queue_kicks.append(fd)
                    self._epoll.register(fd, select.EPOLLIN)
            return list(self._queue_kicks)

    def notify(self, queue: int) -> None:
        if self._closed:
            return
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass  # closed meanwhile

    def reset(self) -> None:
        self._resetting = True
        with self._lock:
            self.transport = None
            self._drop_all()
            self._resetting = False
        self.notify(RX)

    def quiesce(self, timeout: float) -> bool:
        """The guest is gone (stopped, crashed, rolled back): its listeners and streams
        go back to the host, where the service may go on in another instance. Nothing
        is sent to the guest any more; what it already sent was acted on."""
        for listener in list(self._listeners):
            listener.detach(self)  # from now on new connections wait in the listener
        self._resetting = True
        with self._lock:
            if self.transport is not None:
                # What the guest sent before it stopped is acted on: a reply waiting
                # in the tx ring reaches its client, so its request is not re-driven.
                self._process_tx(self.transport)
            self.transport = None
            conns = list(self._conns.values())
            for conn in conns:  # in order: each is parked behind the one before
                if conn.state != CONNECTING:
                    self._surrender(conn)
            for conn in reversed(conns):  # in front of everything, in order
                if conn.state == CONNECTING:
                    self._surrender(conn)
            self._control.clear()
            self._scheduled.clear()
            self._resetting = False
        return True

    def close(self) -> None:
        for listener in list(self._listeners):
            listener.detach(self)
        with self._lock:
            if self._closed:
                return
            self.transport = None
            self._drop_all()
            self._closed = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        self._epoll.close()
        os.close(self._wake)
        for fd in self._queue_kicks:
            os.close(fd)

    def forward(
        self, host_addr: str, host_port: int, guest_port: int, retry_refused: float = 0.0
    ) -> HostListener:
        """Listen on a host TCP port and forward each connection to ``guest_port``."""
        listener = HostListener(host_addr, host_port, guest_port, retry_refused=retry_refused)
        listener.attach(self)
        return listener

    def add_listener(self, listener: HostListener) -> None:
        """Called by ``HostListener.attach``."""
        with self._lock:
            if self._closed:
                raise ValueError("the vsock device is closed")
            self._listeners[listener] = 0
            self._by_fd[listener.fd] = listener
            self._epoll.register(listener.fd, 0)
        self.notify(RX)

    def remove_listener(self, listener: HostListener) -> None:
        """Called by ``HostListener.detach``: unanswered connections go back to it."""
        with self._lock:
            if self._listeners.pop(listener, None) is None:
                return
            self._by_fd.pop(listener.fd, None)
            self._epoll.unregister(listener.fd)
            for conn in reversed(list(self._conns.values())):
                if conn.listener is listener and conn.state == CONNECTING:
                    if not conn.request_due and self.transport is not None:
                        self._control.append((conn.host_port, conn.guest_port, OP_RST))
                    self._give_back(conn)
        self.notify(RX)

    # --- the loop --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            events = self._epoll.poll(self._timeout)
            if self._resetting:
                time.sleep(0.0005)  # let the reset have the lock; events are re-reported
                continue
            with self._lock:
                if self._closed:
                    return
                try:
                    self._pass(events)
                except Exception as exc:  # a bug must not kill the loop silently
                    log(ERROR, "virtio-vsock: backend error: %r", exc)
                    self._drop_all()
                    self.fail(f"internal error: {exc!r}")
                    self._timeout = -1.0

    def _pass(self, events: list[tuple[int, int]]) -> None:
        now = time.monotonic()
        for fd, mask in events:
            if fd == self._wake or fd in self._queue_kicks:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                continue
            target = self._by_fd.get(fd)
            if isinstance(target, HostListener):
                self._accept(target, now)
            elif target is not None:
                self._socket_event(target, mask)
        transport = self.transport
        self._timeout = -1.0
        if transport is not None:
            # No tx kicks while this pass runs: the driver's packets are taken below,
            # and what it adds after that is seen when kicks are back on.
            tx = transport.queues[TX]
            tx.notifications(False)
            for listener in self._listeners:
                if listener.pending:
                    self._accept(listener, now)
            self._process_tx(transport)
        self._timers(now)
        if self.transport is not None:
            self._fill_rx(transport)
        if self.transport is not None and tx.notifications(True):
            self._wait_until(0)  # added without a kick: another pass at once
        self._update_interest()

    def _socket_event(self, conn: Conn, mask: int) -> None:
        if mask & select.EPOLLERR:
            self._abort(conn)
            return
        if mask & select.EPOLLHUP:
            # Both directions are shut; level-triggered HUP would repeat for ever, so
            # the rest of this socket (buffered data, then EOF) is read without epoll.
            self._epoll.unregister(conn.fd)
            conn.polled = False
            self._timed[conn] = None
        if (mask & (select.EPOLLIN | select.EPOLLHUP) and not conn.read_tcp()) or (
            mask & select.EPOLLOUT and not conn.flush_tcp()
        ):
            self._abort(conn)
            return
        self._after(conn)

    # --- connections -----------------------------------------------------------------

    def _accept(self, listener: HostListener, now: float) -> None:
        for _ in range(64):  # bounded, so one busy listener cannot starve the queues
            if len(self._conns) >= self.max_connections:
                return
            parked = listener.accept()
            if parked is None:
                return
            try:
                parked.sock.setblocking(False)
                parked.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                parked.close()
                continue
            conn = Conn(parked, self._alloc_port(), listener.guest_port, self.buf_alloc, listener)
            conn.first_request = now
            conn.deadline = now + self.connect_timeout
            self._conns[conn.key] = conn
            self._by_fd[conn.fd] = conn
            self._epoll.register(conn.fd, 0)
            conn.polled = True
            self._touched[conn] = None  # a reply carried over wants EPOLLOUT
            self._timed[conn] = None
            self._schedule(conn)

    def _alloc_port(self) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < _MASK32 - 1 else FIRST_HOST_PORT
            if not any(key[0] == port for key in self._conns):
                return port

    def _schedule(self, conn: Conn) -> None:
        if not conn.scheduled and self._rx_work(conn) is not None:
            conn.scheduled = True
            self._scheduled.append(conn)

    def _after(self, conn: Conn) -> None:
        """Finish the stream if both directions are done, else schedule its packets."""
        if self._conns.get(conn.key) is not conn:
            return
        self._touched[conn] = None
        if conn.guest_gone:
            if not conn.to_tcp:
                self._remove(conn)
            return
        if conn.host_done() and conn.guest_done():
            self._control.append((conn.host_port, conn.guest_port, OP_RST))
            self._remove(conn)
            return
        self._schedule(conn)

    def _abort(self, conn: Conn) -> None:
        """Reset the stream on both sides."""
        if self._conns.get(conn.key) is not conn:
            return
        told_guest = conn.state == ESTABLISHED or not conn.request_due
        if told_guest and not conn.guest_gone and self.transport is not None:
            self._control.append((conn.host_port, conn.guest_port, OP_RST))
        self._remove(conn, abortive=True)

    def _forget(self, conn: Conn) -> None:
        del self._conns[conn.key]
        self._by_fd.pop(conn.fd, None)
        if conn.polled:
            self._epoll.unregister(conn.fd)
            conn.polled = False

    def _remove(self, conn: Conn, abortive: bool = False) -> None:
        self._forget(conn)
        conn.close(abortive)

    def _give_back(self, conn: Conn) -> None:
        """Return a connection the guest never accepted to its listener, to wait."""
        self._forget(conn)
        assert conn.listener is not None
        conn.listener.park(conn.park(), first=True)

    def _surrender(self, conn: Conn) -> None:
        """Take a stream from a guest that stopped: to its listener if another guest
        can go on with it, else closed (orderly only if it was complete)."""
        if conn.state == CONNECTING:
            self._give_back(conn)
        elif conn.listener is not None and conn.can_redrive():
            self._forget(conn)
            self.redriven += bool(conn.unanswered)
            conn.listener.park(conn.park(redrive=True))
        else:
            conn.flush_tcp()
            self._remove(conn, abortive=bool(conn.to_tcp) or not conn.guest_shut_send)

    def _hand_back(self, conn: Conn) -> None:
        """The guest will read no more from this client: the next guest takes it."""
        assert conn.listener is not None
        self._control.append((conn.host_port, conn.guest_port, OP_RST))
        self._forget(conn)
        conn.listener.park(conn.park())
        self._wait_until(0)  # if the listener is ours, offer it again next pass

    def _drop_all(self) -> None:
        for conn in reversed(list(self._conns.values())):
            if conn.state == CONNECTING and conn.listener in self._listeners:
                self._give_back(conn)
            else:
                self._remove(conn, abortive=True)
        self._control.clear()
        self._scheduled.clear()

    def _timers(self, now: float) -> None:
        for conn in list(self._timed):
            if self._conns.get(conn.key) is not conn or (conn.state != CONNECTING and conn.polled):
                del self._timed[conn]
                continue
            if conn.state == CONNECTING:
                if now >= conn.deadline:
                    if self._may_retry(conn, now):
                        conn.request_due = True
                        conn.deadline = now + self.connect_timeout
                        self._schedule(conn)
                    else:
                        self._abort(conn)
                        continue
                self._wait_until(conn.deadline - now)
            elif not conn.polled:
                # Reading a hung-up socket by hand (see _socket_event).
                if not conn.read_tcp() or not conn.flush_tcp():
                    self._abort(conn)
                    continue
                self._after(conn)
                if conn.wants_read():
                    self._wait_until(0)

    def _may_retry(self, conn: Conn, now: float) -> bool:
        listener = conn.listener
        return listener is not None and now - conn.first_request < listener.retry_refused

    def _wait_until(self, delay: float) -> None:
        delay = max(delay, 0.0)
        if self._timeout < 0 or delay < self._timeout:
            self._timeout = delay

    def _update_interest(self) -> None:
        touched, self._touched = self._touched, {}
        for conn in touched:
            if conn.polled and self._conns.get(conn.key) is conn:
                mask = conn.epoll_mask()
                if mask != conn.mask:
                    self._epoll.modify(conn.fd, mask)
                    conn.mask = mask
        accepting = self.transport is not None and len(self._conns) < self.max_connections
        wanted = select.EPOLLIN if accepting else 0
        for listener, mask in self._listeners.items():
            if mask != wanted:
                self._epoll.modify(listener.fd, wanted)
                self._listeners[listener] = wanted

    # --- guest → host ----------------------------------------------------------------

    def _process_tx(self, transport: VirtioMmioTransport) -> None:
        queue = transport.queues[TX]
        done = 0
        while done < queue.size and self.transport is not None:
            chain = self.pop(queue)
            if chain is None:
                break
            self._guest_packet(chain, queue.note_error)
            queue.push(chain.head, 0)
            done += 1
        else:
            self._wait_until(0)  # more may be waiting; serve the sockets first
        if done:
            transport.used(TX)

    def _guest_packet(self, chain: Chain, note_error) -> None:
        if chain.readable_len < HDR.size:
            self.dropped += 1
            note_error("vsock packet shorter than its header")
            return
        readable = chain.readable
        first = readable[0]
        if len(first) >= HDR.size:  # header (and usually payload) in one descriptor
            fields = HDR.unpack_from(first)
        else:
            first = None
            fields = HDR.unpack(gather(readable, HDR.size))
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd = fields
        if length > chain.readable_len - HDR.size or length > MAX_PKT:
            self.dropped += 1
            note_error(f"vsock packet length {length} does not fit its buffers")
            return
        if src_cid != self.guest_cid or dst_cid != HOST_CID:
            self.dropped += 1
            note_error(f"vsock packet from CID {src_cid} to {dst_cid} dropped")
            return
        conn = self._conns.get((dst_port, src_port))
        if conn is None or kind != TYPE_STREAM:
            if op == OP_REQUEST:
                self.refused += 1
            if op != OP_RST and len(self._control) < MAX_PENDING_REPLIES:
                self._control.append((dst_port, src_port, OP_RST))
            return
        conn.peer_credit(buf_alloc, fwd)
        if op == OP_RESPONSE and conn.state == CONNECTING and not conn.request_due:
            conn.state = ESTABLISHED
        elif op == OP_RW and conn.state == ESTABLISHED and not conn.guest_shut_send:
            if conn.guest_gone:
                return
            if length > conn.guest_room():
                note_error(f"vsock port {dst_port}: guest sent beyond its credit")
                self._abort(conn)
                return
            if first is not None and len(first) >= HDR.size + length:
                data = first[HDR.size : HDR.size + length]  # no copy: sent from guest RAM
            else:
                data = memoryview(gather(readable, length, HDR.size))
            conn.rx_cnt = (conn.rx_cnt + length) & _MASK32
            if length:
                conn.guest_sent()
            if not conn.send_tcp(data):
                self._abort(conn)
                return
        elif op == OP_CREDIT_REQUEST:
            conn.credit_requested = True
        elif op == OP_SHUTDOWN and conn.state == ESTABLISHED:
            if flags == SHUTDOWN_RCV and conn.listener is not None and not conn.guest_shut_send:
                self._hand_back(conn)
                return
            conn.guest_shut_send |= bool(flags & SHUTDOWN_SEND)
            if flags & SHUTDOWN_RCV:
                conn.guest_shut_rcv = True
                conn.to_guest.clear()
            if not conn.flush_tcp():
                self._abort(conn)
                return
        elif op == OP_RST:
            self._guest_reset(conn)
            return
        elif op != OP_CREDIT_UPDATE:
            note_error(f"vsock port {dst_port}: unexpected op {op} in state {conn.state}")
            self._abort(conn)
            return
        self._after(conn)

    def _guest_reset(self, conn: Conn) -> None:
        if conn.state == CONNECTING:
            now = time.monotonic()
            if self._may_retry(conn, now):
                conn.request_due = False  # re-sent when the back-off ends
                conn.deadline = now + min(0.05 * 2**conn.attempts, 1.0)
                conn.attempts += 1
            else:
                self._remove(conn, abortive=True)  # refused: the client is reset
            return
        if not conn.guest_shut_send:
            self._remove(conn, abortive=True)  # an abort, not the end of a close
            return
        conn.guest_gone = True
        conn.to_guest.clear()
        self._after(conn)  # closes once what the guest sent has reached the client

    # --- host → guest ----------------------------------------------------------------

    def _rx_work(self, conn: Conn) -> int | None:
        if conn.state == CONNECTING:
            return OP_REQUEST if conn.request_due else None
        if conn.guest_gone:
            return None
        if conn.to_guest and conn.credit() > 0:
            return OP_RW
        if conn.tcp_eof and not conn.to_guest and not conn.sent_shutdown:
            return None if conn.guest_shut_rcv else OP_SHUTDOWN
        if conn.credit_update_due():
            return OP_CREDIT_UPDATE
        return None

    def _fill_rx(self, transport: VirtioMmioTransport) -> None:
        queue = transport.queues[RX]
        pushed = 0
        while self._control or self._scheduled:
            conn = op = None
            if not self._control:
                conn = self._scheduled[0]
                op = self._rx_work(conn) if self._conns.get(conn.key) is conn else None
                if op is None:
                    self._scheduled.popleft()
                    conn.scheduled = False
                    continue
            chain = self.pop(queue)
            if chain is None:
                break  # no buffers: the driver's next rx kick wakes us
            pushed += 1
            if chain.writable_len < HDR.size:
                self.dropped += 1
                queue.note_error("vsock rx buffer shorter than a header")
                queue.push(chain.head, 0)
                continue
            if conn is None:
                host_port, guest_port, cop = self._control.popleft()
                self._put_header(chain, host_port, guest_port, cop, 0, 0, 0, 0)
                queue.push(chain.head, HDR.size)
                continue
            queue.push(chain.head, self._conn_packet(chain, conn, op))
            self._scheduled.popleft()
            conn.scheduled = False
            self._after(conn)
        if pushed:
            transport.used(RX)

    def _conn_packet(self, chain: Chain, conn: Conn, op: int) -> int:
        payload = b""
        flags = 0
        if op == OP_RW:
            to_guest = conn.to_guest
            n = min(len(to_guest), conn.credit(), chain.writable_len - HDR.size, MAX_PKT)
            if n > 0:
                if n == len(to_guest):  # all of it: the buffer itself moves on
                    payload = to_guest
                    conn.to_guest = bytearray()
                else:
                    payload = to_guest[:n]
                    del to_guest[:n]
                conn.sent_to_guest(payload)
            else:
                op = OP_CREDIT_UPDATE  # a buffer with room for the header only
        elif op == OP_SHUTDOWN:
            flags = SHUTDOWN_SEND
            conn.sent_shutdown = True
        elif op == OP_REQUEST:
            conn.request_due = False
            conn.deadline = time.monotonic() + self.connect_timeout
        conn.credit_requested = False
        conn.adv_fwd_cnt = conn.fwd_cnt
        length = len(payload)
        first = self._put_header(
            chain, conn.host_port, conn.guest_port, op, flags, length, self.buf_alloc, conn.fwd_cnt
        )
        if first is not None and len(first) >= HDR.size + length:
            first[HDR.size : HDR.size + length] = payload
        else:
            scatter(chain.writable, payload, HDR.size)
        return HDR.size + length

    def _put_header(
        self,
        chain: Chain,
        host_port: int,
        guest_port: int,
        op: int,
        flags: int,
        length: int,
        buf: int,
        fwd: int,
    ) -> memoryview | None:
        """Write a packet's header at the start of the chain's writable buffers; the
        first buffer if the header fit in it (the payload usually goes after it)."""
        fields = (HOST_CID, self.guest_cid, host_port, guest_port, length, TYPE_STREAM, op, flags)
        first = chain.writable[0]
        if len(first) >= HDR.size:
            HDR.pack_into(first, 0, *fields, buf, fwd)
            return first
        scatter(chain.writable, HDR.pack(*fields, buf, fwd))
        return None
