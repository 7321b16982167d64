"""A host-side connection to one instance's maintenance agent (vsock port 7000).

The agent speaks a line protocol (``ready?`` / ``release`` / ``acquire`` / ``fault``),
reached through a host listener on the instance's own vsock device, like any other
client: no hypervisor interface. Open agents are counted (``open_agents``) so that
``status`` can show a leak: at quiescence the count is 0.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable

from ..node import ServiceDevices

AGENT_PORT = 7000
POLL_S = 0.05  # how often a wait for a reply looks whether the instance still lives
MAX_LINE = 4096

_count_lock = threading.Lock()
_open = 0


def open_agents() -> int:
    return _open


class Agent:
    """One connection; ``ask`` sends a command and waits for its reply line."""

    def __init__(self, services: ServiceDevices, partition: int, timeout: float) -> None:
        global _open
        vsock = services.vsocks[partition]
        self.partition = partition
        self._listener = vsock.forward("127.0.0.1", 0, AGENT_PORT)
        try:
            self._sock = socket.create_connection(self._listener.address, timeout=timeout)
        except BaseException:
            self._listener.close()
            raise
        self._buffer = bytearray()
        self._closed = False
        self.broken = False  # a reply is overdue: the next one would be out of step
        with _count_lock:
            _open += 1

    def ask(self, command: str, timeout: float, alive: Callable[[], bool] | None = None) -> str:
        """One command, one reply line. ``alive`` is checked while waiting: when the
        instance is gone the wait ends at once (ConnectionError) instead of at the
        time-out. After a time-out the connection is of no further use (a late reply
        would answer the next command): open a new Agent."""
        if self.broken:
            raise ConnectionError("the agent connection is out of step after a time-out")
        deadline = time.monotonic() + timeout
        self._sock.settimeout(timeout)
        self._sock.sendall(command.encode() + b"\n")
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.broken = True
                raise TimeoutError(f"no reply to {command!r} within {timeout:g} s")
            readable, _, _ = select.select([self._sock], [], [], min(remaining, POLL_S))
            if not readable:
                if alive is not None and not alive():
                    self.broken = True
                    raise ConnectionError("the instance is gone (crashed or powered off)")
                continue
            chunk = self._sock.recv(4096)
            if not chunk:
                self.broken = True
                raise ConnectionError("the agent closed the connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_LINE and b"\n" not in self._buffer:
                self.broken = True
                raise ConnectionError("the agent sent an over-long line")
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        global _open
        if self._closed:
            return
        self._closed = True
        with _count_lock:
            _open -= 1
        self._sock.close()
        self._listener.close()
