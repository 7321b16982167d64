"""One vsock stream between a host TCP socket and a guest port, as the vsock
backend's thread sees it. Pure state and non-blocking socket I/O: the device decides
what goes on the queues.

Flow control, guest → host: we advertise ``buf_alloc`` bytes and count in
``fwd_cnt`` what has left our buffer for the TCP socket. The buffer (``to_tcp``) can
never hold more than ``buf_alloc``, so when the TCP client is slow its send buffer
fills, ``fwd_cnt`` stops moving and the guest runs out of credit.

Host → guest: we may have at most ``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes
in flight (``peer_buf_alloc`` capped at ``MAX_WINDOW``). The TCP socket is read only
when that credit is positive and the last read has been handed to the guest, so a
slow guest leaves data in the kernel's TCP buffers and the client blocks. A copy of
what is in flight (``unacked``) is kept until the guest's ``fwd_cnt`` says it was
consumed, so the stream can be handed to another guest (``park``) without losing a
byte; the cap bounds that copy whatever the guest advertises.

Consumed bytes are kept a little longer, in ``unanswered``: those the guest took
since it last sent anything on the stream. When a guest is stopped without handing
its streams back (a crash, a rollback), they are the request it was working on, and
the next guest is given them again (``park(redrive=True)``) so the client still gets
its one reply. A reply ends that span; past ``MAX_WINDOW`` unanswered bytes (a long
upload) the stream cannot be re-driven and is reset instead.
"""

from __future__ import annotations

import select
import socket

from .forward import Parked, close_socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .forward import HostListener

CONNECTING = "connecting"
ESTABLISHED = "established"

READ_CHUNK = 64 << 10
MAX_WINDOW = 1 << 20  # the most host → guest bytes in flight per stream
_MASK32 = 0xFFFF_FFFF


class Conn:
    def __init__(
        self,
        parked: Parked,
        host_port: int,
        guest_port: int,
        buf_alloc: int,
        listener: HostListener | None,
    ) -> None:
        self.sock = parked.sock
        self.fd = parked.sock.fileno()
        self.host_port = host_port
        self.guest_port = guest_port
        self.key = (host_port, guest_port)  # the device's table key (fixed for life)
        self.buf_alloc = buf_alloc
        self.listener = listener
        self.state = CONNECTING
        self.deadline = 0.0  # connect time-out, or when to retry a refused request
        self.first_request = 0.0
        self.request_due = True
        self.attempts = 0  # refused requests repeated so far
        # host → guest
        self.to_guest = bytearray(parked.replay)
        self.unacked = bytearray()  # sent to the guest, not yet consumed by it
        self.unanswered = bytearray()  # consumed by the guest since it last sent
        self.redrivable = True  # unanswered holds all of it (see above)
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.tcp_eof = parked.eof
        self.sent_shutdown = False
        # guest → host
        self.to_tcp = bytearray(parked.reply)
        self.carried = len(parked.reply)  # head of to_tcp from an earlier guest: uncounted
        self.rx_cnt = 0
        self.fwd_cnt = 0
        self.adv_fwd_cnt = 0  # fwd_cnt as last told to the guest
        self.credit_threshold = min(buf_alloc // 4, 64 << 10)  # freed bytes worth telling
        self.credit_requested = False
        self.guest_shut_send = False
        self.guest_shut_rcv = False
        self.guest_gone = False  # the guest reset the stream; only flushing remains
        self.tcp_shut_wr = False
        # bookkeeping for the device
        self.mask = 0
        self.polled = False
        self.scheduled = False

    def credit(self) -> int:
        """Bytes the guest can take now."""
        window = self.peer_buf_alloc
        if window > MAX_WINDOW:
            window = MAX_WINDOW
        return window - ((self.tx_cnt - self.peer_fwd_cnt) & _MASK32)

    def sent_to_guest(self, payload: bytearray) -> None:
        """``payload`` (a buffer no one else holds) went to the guest."""
        if self.unacked:
            self.unacked += payload
        else:
            self.unacked = payload  # the usual case: the guest consumed all before
        self.tx_cnt = (self.tx_cnt + len(payload)) & _MASK32

    def peer_credit(self, buf_alloc: int, fwd_cnt: int) -> None:
        """The guest's buffer and what it has consumed, from any packet's header."""
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt
        consumed = len(self.unacked) - ((self.tx_cnt - fwd_cnt) & _MASK32)
        if consumed > 0:
            if consumed == len(self.unacked) and not self.unanswered:
                # All of it, as a request/response stream goes: move it, no copies.
                if self.redrivable and consumed <= MAX_WINDOW:
                    self.unanswered = self.unacked
                elif self.redrivable:
                    self.redrivable = False
                self.unacked = bytearray()
                return
            if self.redrivable:
                self.unanswered += self.unacked[:consumed]
                if len(self.unanswered) > MAX_WINDOW:
                    self.redrivable = False
                    self.unanswered.clear()
            del self.unacked[:consumed]

    def guest_sent(self) -> None:
        """The guest sent data on the stream: what it consumed before is answered."""
        self.unanswered.clear()
        self.redrivable = True

    def park(self, redrive: bool = False) -> Parked:
        """This client connection as the next guest should take it over: from the
        first byte this guest did not consume (it handed the stream back at a request
        boundary), or with ``redrive`` from the first byte it did not answer."""
        replay = bytes((self.unanswered if redrive else b"") + self.unacked + self.to_guest)
        return Parked(self.sock, replay, bytes(self.to_tcp), self.tcp_eof)

    def can_redrive(self) -> bool:
        """Whether another guest can take the stream over from a guest that stopped."""
        return (
            self.state == ESTABLISHED
            and self.redrivable
            and not (self.guest_shut_send or self.guest_shut_rcv or self.guest_gone)
        )

    def guest_room(self) -> int:
        """Bytes the guest may still send before exceeding our advertised buffer."""
        return self.buf_alloc - ((self.rx_cnt - self.fwd_cnt) & _MASK32)

    def wants_read(self) -> bool:
        return (
            self.state == ESTABLISHED
            and not (self.tcp_eof or self.guest_shut_rcv or self.guest_gone or self.to_guest)
            and self.credit() > 0
        )

    def epoll_mask(self) -> int:
        mask = select.EPOLLIN if self.wants_read() else 0
        if self.to_tcp:
            mask |= select.EPOLLOUT
        return mask

    def read_tcp(self) -> bool:
        """Read what the guest has credit for. False if the socket failed."""
        if not self.wants_read():
            return True
        try:
            data = self.sock.recv(min(self.credit(), READ_CHUNK))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if data:
            self.to_guest += data
        else:
            self.tcp_eof = True
        return True

    def send_tcp(self, data: memoryview) -> bool:
        """Guest data on an open stream (the guest may still send): straight to the
        client when nothing is waiting before it, the rest buffered for EPOLLOUT.
        False if the socket failed."""
        if self.to_tcp or not data:
            self.to_tcp += data
            return self.flush_tcp()
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return False
        self.fwd_cnt = (self.fwd_cnt + sent) & _MASK32  # nothing carried: to_tcp was empty
        if sent < len(data):
            self.to_tcp += data[sent:]
        return True

    def flush_tcp(self) -> bool:
        """Send buffered guest data to the client. False if the socket failed."""
        if self.to_tcp:
            try:
                sent = self.sock.send(self.to_tcp)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return False
            del self.to_tcp[:sent]
            carried = min(sent, self.carried)
            self.carried -= carried
            self.fwd_cnt = (self.fwd_cnt + sent - carried) & _MASK32
        if not self.to_tcp and self.guest_shut_send and not self.tcp_shut_wr:
            self.tcp_shut_wr = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                return False
        return True

    def credit_update_due(self) -> bool:
        freed = (self.fwd_cnt - self.adv_fwd_cnt) & _MASK32
        # A guest out of credit has buf_alloc bytes outstanding, so this always fires
        # before it could stall.
        return self.credit_requested or freed >= self.credit_threshold

    def host_done(self) -> bool:
        """Nothing more will go to the guest."""
        return self.guest_shut_rcv or (self.tcp_eof and not self.to_guest and self.sent_shutdown)

    def guest_done(self) -> bool:
        """Nothing more will go to the client."""
        return self.guest_shut_send and not self.to_tcp and self.tcp_shut_wr

    def close(self, abortive: bool = False) -> None:
        close_socket(self.sock, abortive)
