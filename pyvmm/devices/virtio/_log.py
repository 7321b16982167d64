"""Logging for the virtio devices, imported lazily: ``logging`` costs ~15 ms of
import (it pulls in re, enum, traceback) and errors are rare, so the boot path
does not pay for it."""

from __future__ import annotations

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40


def log(level: int, message: str, *args: object) -> None:
    import logging

    logging.getLogger("pyvmm.virtio").log(level, message, *args)
