"""Host TCP port → guest vsock port forwarding, detachable from its device.

A ``HostListener`` owns the listening TCP socket and outlives any one vsock device:
``attach(device)`` makes that device's thread accept connections and open a vsock
stream to ``guest_port`` for each; ``detach()`` stops it. In between, nothing is
refused: new connections wait in the kernel's accept backlog, and connections that
were accepted but not yet answered by the guest (no RESPONSE) come back to the
listener's ``pending`` list and are offered again to the next device. That is the
hand-off of a service from one OS instance to another: detach from A's device,
attach to B's.

Established streams stay with the device that carried them, unless the guest hands
one back: a guest that shuts down only the receive side of a forwarded stream
(vsock SHUTDOWN with RCV alone), having sent all its replies, says "I will read no
more requests from this client". The device then parks the client's connection
here with the bytes the guest received but never consumed (its ``fwd_cnt`` tells
how many) and any reply still on its way to the client, and the next device to
take the connection replays them first. So a keep-alive client moves from one
instance to the next without seeing its connection closed, and a request that
arrived during the hand-off is served by the new instance.

A device taken from a guest that stopped (``VirtioVsock.quiesce``) detaches its
listeners and parks its streams here the same way, re-driving the request the guest
had taken but not answered; streams that cannot go on are closed.

A refusal (RST to our REQUEST) closes the client's connection, unless
``retry_refused`` seconds are given: then the request is repeated with back-off for
that long, which covers a new instance whose service is not listening yet.

Imports go one way: ``vsock`` → ``vsock_conn`` → ``forward``. A listener knows its
device only as a ``ListenerDevice`` (what it calls of it), not as ``VirtioVsock``.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque

DEFAULT_BACKLOG = 1024
_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close sends RST

_count_lock = threading.Lock()
_open = 0


def open_listeners() -> int:
    """Host listeners created and not yet closed in this process, of any kind (a
    back-end process's listener has one here: ``count_listener``); ``status`` shows
    leaks with it."""
    return _open


def count_listener(delta: int) -> None:
    """A listener of another kind was opened (+1) or closed (-1)."""
    global _open
    with _count_lock:
        _open += delta


TYPE_CHECKING = False
if TYPE_CHECKING:  # for type checkers only: typing costs a back-end process ~0.5 MiB
    from typing import Protocol

    class ListenerDevice(Protocol):
        """What a ``HostListener`` calls of the device it is attached to."""

        def add_listener(self, listener: HostListener) -> None: ...

        def remove_listener(self, listener: HostListener) -> None: ...

        def notify(self, queue: int) -> None: ...


class Parked:
    """A client connection waiting for a guest, with what it carries over."""

    __slots__ = ("eof", "replay", "reply", "sock")

    def __init__(
        self, sock: socket.socket, replay: bytes = b"", reply: bytes = b"", eof: bool = False
    ) -> None:
        self.sock = sock
        self.replay = replay  # client bytes no guest has consumed yet, oldest first
        self.reply = reply  # guest bytes not yet written to the client
        self.eof = eof  # the client has shut down its sending side

    def close(self) -> None:
        """Close the client's connection: a reset if it carries bytes in either
        direction (it was cut short mid-exchange), else an orderly close."""
        close_socket(self.sock, abortive=bool(self.replay or self.reply))


def close_socket(sock: socket.socket, abortive: bool = False) -> None:
    """Close a client's connection; ``abortive`` resets it (TCP RST), so a client never
    takes a stream that was cut short for a complete one."""
    try:
        if abortive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        sock.close()
    except OSError:
        pass


def listening_socket(
    host_addr: str, host_port: int, backlog: int = DEFAULT_BACKLOG
) -> socket.socket:
    """A TCP socket bound to ``host_addr:host_port`` (0: any free port) and listening."""
    family = socket.AF_INET6 if ":" in host_addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host_addr, host_port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class HostListener:
    def __init__(
        self,
        host_addr: str,
        host_port: int,
        guest_port: int,
        backlog: int = DEFAULT_BACKLOG,
        retry_refused: float = 0.0,
        sock: socket.socket | None = None,
    ) -> None:
        """Listen on ``host_addr:host_port``, or take over ``sock``, a socket already
        listening (a back-end process gets the VMM's, whose listen queue outlives it)."""
        self.guest_port = guest_port
        self.retry_refused = retry_refused
        self.sock = listening_socket(host_addr, host_port, backlog) if sock is None else sock
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        # Accepted connections not (or no longer) connected to a guest, oldest first.
        self.pending: deque[Parked] = deque()
        self.device: ListenerDevice | None = None
        self._lock = threading.Lock()  # serialises attach/detach
        self._closed = False
        global _open
        with _count_lock:
            _open += 1

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def attach(self, device: ListenerDevice) -> None:
        with self._lock:
            if self.device is device:
                return
            if self.device is not None:
                self.device.remove_listener(self)
                self.device = None
            device.add_listener(self)
            self.device = device

    def detach(self, device: ListenerDevice | None = None) -> None:
        """Stop forwarding (only from ``device``, if given); connections that arrive
        from now on wait."""
        with self._lock:
            if self.device is not None and device in (None, self.device):
                self.device.remove_listener(self)
                self.device = None

    def close(self) -> None:
        global _open
        self.detach()
        with _count_lock:
            if not self._closed:
                self._closed = True
                _open -= 1
        self.sock.close()  # first: a device parking a connection from now on closes it
        while self.pending:
            self.pending.popleft().close()

    def accept(self) -> Parked | None:
        """The next connection to forward (held ones first), or None."""
        if self.pending:
            return self.pending.popleft()
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return None  # e.g. ECONNABORTED: the client gave up while queued
        return Parked(sock)

    def park(self, parked: Parked, first: bool = False) -> None:
        """Hold a connection a device gave back, to be offered to the next one
        (``first``: before all others, for one that was never answered)."""
        if self.sock.fileno() < 0:
            parked.close()  # the listener is closed: nobody will take it
        else:
            if first:
                self.pending.appendleft(parked)
            else:
                self.pending.append(parked)
            device = self.device
            if device is not None:
                device.notify(0)  # wake its loop to offer the connection
