"""A host-side connection to one instance's maintenance agent (vsock port 7000).

The agent speaks a line protocol (``ready?`` / ``release`` / ``acquire`` / ``fault``),
reached through a host listener on the instance's own vsock device, like any other
client: no hypervisor interface. Open agents are counted (``open_agents``) so that
``status`` can show a leak: at quiescence the count is 0.
"""

from __future__ import annotations

import socket
import threading

from ..node import ServiceDevices

AGENT_PORT = 7000

_count_lock = threading.Lock()
_open = 0


def open_agents() -> int:
    return _open


class Agent:
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
        self._reader = self._sock.makefile("rb")
        self._closed = False
        with _count_lock:
            _open += 1

    def ask(self, command: str, timeout: float) -> str:
        """One command, one reply line. After a time-out the connection is unusable (a
        timed-out socket file cannot be read again): close it and open a new Agent."""
        self._sock.settimeout(timeout)
        self._sock.sendall(command.encode() + b"\n")
        line = self._reader.readline(4096)
        if not line:
            raise ConnectionError("the agent closed the connection")
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        global _open
        if self._closed:
            return
        self._closed = True
        with _count_lock:
            _open -= 1
        self._reader.close()
        self._sock.close()
        self._listener.close()
