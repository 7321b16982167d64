"""The node's consoles: where the serial ports' output goes, and where their input
comes from (this process's stdin, fed from a thread)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

from .devices.uart import Uart16550


class Console:
    """Where a UART's output goes (stdout by default).

    While two instances share a terminal, both consoles are in line mode: they write
    whole lines only, so output cannot interleave mid-line, and a labelled console
    prefixes each line with its instance's name.
    """

    def __init__(self, write: Callable[[bytes], None] | None = None) -> None:
        self._write = write or write_stdout
        self.label = b""
        self.line_mode = False
        self._pending = bytearray()
        # Called with each whole line written in line mode (an upgrade's trace).
        self.on_line: Callable[[bytes], None] | None = None

    def __call__(self, data: bytes) -> None:
        if not self.line_mode and not self.label:
            self._write(data)
            return
        self._pending += data
        if b"\n" not in data:
            return
        complete, _, rest = bytes(self._pending).rpartition(b"\n")
        self._pending = bytearray(rest)
        lines = [self.label + line for line in complete.split(b"\n")]
        self._write(b"".join(line + b"\n" for line in lines))
        if self.on_line is not None:
            for line in lines:
                self.on_line(line)

    def flush(self, end_line: bool = False) -> None:
        """Write a partial line held back in line mode (ended, if nothing will
        complete it)."""
        if self._pending:
            pending, self._pending = bytes(self._pending), bytearray()
            self._write(self.label + pending + (b"\n" if end_line else b""))


def write_stdout(data: bytes) -> None:
    try:
        os.write(sys.stdout.fileno(), data)
    except (BrokenPipeError, OSError):
        pass  # a closed console must not stop the guest


def start_stdin_feeder(uart: Uart16550) -> threading.Thread | None:
    """Feed this process's standard input to a UART, from a daemon thread."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return None

    def pump() -> None:
        while not uart.closed:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            uart.feed(data)

    thread = threading.Thread(target=pump, name="stdin-feeder", daemon=True)
    thread.start()
    return thread
