"""A record of every write and flush a disk image receives, to rebuild the image as
it would stand after a power cut (as Linux's dm-log-writes does).

A SIGKILLed VMM leaves the host's page cache intact, so it proves nothing about
durability. With a journal, a checker can build the image as of any moment: the
base image plus the writes a completed flush had covered by then, the later writes
dropped (or a random part of them kept, as a disk may have written some). The
guest's recovery must find every write it acknowledged before that moment.

File format, append-only, one record per completed request:
``<c d Q I>`` kind (``W`` write, ``F`` flush), CLOCK_MONOTONIC time at completion,
then for ``W`` the byte offset and the length followed by the data; for ``F`` the
number of ``W`` records the flush covers (those complete when it was issued) and 0.
The time is taken after the request completed and before the guest can see it, so a
client's acknowledgement always comes later than the records it depends on.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

_RECORD = struct.Struct("<cdQI")
WRITE, FLUSH = b"W", b"F"


class WriteJournal:
    """Shared by every front-end of one image (their writes are serialised by the
    write lease; the journal's lock orders the records). A journal that already has
    records (a disk back-end process restarted on it) is continued: its torn last
    record, if any, is cut off and its writes are counted, so flushes go on covering
    the right ones."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()
        with open(self._fd, "rb", closefd=False) as f:
            blob = f.read()
        end, self.writes = _whole_records(blob)
        if end < len(blob):
            os.ftruncate(self._fd, end)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            os.write(self._fd, _RECORD.pack(WRITE, time.monotonic(), offset, len(data)) + data)
            self.writes += 1

    def flush_issued(self) -> int:
        """Call before the flush: the writes it will cover."""
        return self.writes

    def flushed(self, covers: int) -> None:
        with self._lock:
            os.write(self._fd, _RECORD.pack(FLUSH, time.monotonic(), covers, 0))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@dataclass(frozen=True)
class Record:
    kind: bytes
    time: float
    offset: int  # WRITE: byte offset; FLUSH: writes covered
    data: bytes = b""


def read_journal(path: str) -> list[Record]:
    """The records; a torn last record (the VMM was killed mid-append) is dropped."""
    with open(path, "rb") as f:
        blob = f.read()
    return list(_records(blob))


def _whole_records(blob: bytes) -> tuple[int, int]:
    """Where the last whole record of ``blob`` ends, and how many writes it holds."""
    pos = writes = 0
    while pos + _RECORD.size <= len(blob):
        kind, _, _, length = _RECORD.unpack_from(blob, pos)
        size = _RECORD.size + (length if kind == WRITE else 0)
        if kind not in (WRITE, FLUSH) or pos + size > len(blob):
            break
        pos += size
        writes += kind == WRITE
    return pos, writes


def _records(blob: bytes) -> Iterator[Record]:
    pos = 0
    while pos + _RECORD.size <= len(blob):
        kind, when, offset, length = _RECORD.unpack_from(blob, pos)
        pos += _RECORD.size
        if kind == WRITE:
            if pos + length > len(blob):
                return
            yield Record(kind, when, offset, blob[pos : pos + length])
            pos += length
        elif kind == FLUSH:
            yield Record(kind, when, offset)
        else:
            return


def durable_writes(records: list[Record], cut: float) -> int:
    """How many writes (in journal order) a power cut at ``cut`` keeps for sure:
    those covered by the last flush completed by then."""
    covered = 0
    for record in records:
        if record.time > cut:
            break
        if record.kind == FLUSH:
            covered = max(covered, record.offset)
    return covered


def image_at(
    base: bytes, records: list[Record], cut: float, extra: set[int] | None = None
) -> bytes:
    """The image after a power cut at ``cut``: ``base`` plus the durable writes, plus
    the unflushed writes (completed by ``cut``) whose indexes are in ``extra``."""
    image = bytearray(base)
    keep = durable_writes(records, cut)
    index = 0
    for record in records:
        if record.kind != WRITE:
            continue
        if index < keep or (extra and index in extra and record.time <= cut):
            end = record.offset + len(record.data)
            if end > len(image):
                image.extend(bytes(end - len(image)))
            image[record.offset : end] = record.data
        index += 1
    return bytes(image)


def unflushed(records: list[Record], cut: float) -> list[int]:
    """Indexes of the writes completed by ``cut`` that no flush had covered."""
    keep = durable_writes(records, cut)
    writes = [r for r in records if r.kind == WRITE]
    return [i for i in range(keep, len(writes)) if writes[i].time <= cut]
