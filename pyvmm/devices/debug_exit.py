"""The debug-exit port (QEMU's isa-debug-exit convention, port 0xf4).

A write ends the run with the written value as the exit code. Unlike QEMU, which
exits with (value << 1) | 1, pyvmm exits with the value itself.
"""

from __future__ import annotations

from collections.abc import Callable

from .bus import Device

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4


class DebugExit(Device):
    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: memoryview) -> None:
        self._on_exit(data[0])
