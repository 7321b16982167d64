"""Logging for the virtio devices, imported lazily: ``logging`` costs ~15 ms of
import (it pulls in re, enum, traceback) and errors are rare, so the boot path
does not pay for it."""

from __future__ import annotations

DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40


_stderr_format: str | None = None  # for basicConfig at the first message (log_to_stderr)


def log_to_stderr(fmt: str = "%(name)s: %(message)s") -> None:
    """For a process of its own (a back-end): WARNING and above to stderr in ``fmt``.
    ``logging`` is configured, and so imported, only when a first message comes."""
    global _stderr_format
    _stderr_format = fmt


def log(level: int, message: str, *args: object) -> None:
    global _stderr_format
    import logging

    if _stderr_format is not None:
        logging.basicConfig(level=logging.WARNING, format=_stderr_format)
        _stderr_format = None
    logging.getLogger("pyvmm.virtio").log(level, message, *args)
