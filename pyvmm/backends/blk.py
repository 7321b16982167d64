"""The virtio-blk back-end process: ``python -m pyvmm.backends.blk --control PATH
--disk FILE [--read-only] [--journal PATH] [--parent PID]``, one per disk, serving the
front-end of every partition (``host``). ``--journal``: every write and flush is
recorded there for power-cut checks (``devices.virtio.blk_journal``,
``PYVMM_DISK_JOURNAL``).

Each front-end's requests are served by the in-process device model itself
(``devices.virtio.blk.VirtioBlk``: request parsing, I/O, worker thread, unchanged)
over the vhost-user rings. All of them share one ``WriteLease``, inside this process,
held by no front-end at first: every front-end may read, only the holder may write,
and a write by any other fails with IOERR.

Control op ``lease`` {"holder": NAME or null} moves it and replies once the
previous holder can write no more (a write in progress finishes first: ``grant``
takes the lock every write holds). The reply says who holds it.

Control op ``fault`` is fault injection for tests and the upgrade's ``--inject``:
{"write_delay_s": S} makes every write hold the lease for S seconds more (at most
``MAX_WRITE_DELAY_S``), and ``status`` counts the writes in progress (``writing``), so
a test can move the lease while a write is known to be in flight; {"fail_io": {NAME:
bool}} makes every I/O of those front-ends fail (``VirtioBlk.fail_io``: disk-eio).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from ..devices.virtio.blk import VirtioBlk, WriteLease
from .host import DeviceType, control_op, run

MAX_WRITE_DELAY_S = 5.0


class Faults:
    """Fault injection shared by a process's front-ends (the ``fault`` op)."""

    def __init__(self) -> None:
        self.write_delay_s = 0.0
        self.writing = 0  # writes in progress
        self.lock = threading.Lock()


class BlkModel(VirtioBlk):
    """``VirtioBlk`` with the process's fault injection on writes."""

    def __init__(self, faults: Faults, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.faults = faults

    def _io(self, sector: int, views: list[memoryview], write: bool) -> int:
        faults = self.faults
        if not write or not faults.write_delay_s:
            return super()._io(sector, views, write)
        with faults.lock:
            faults.writing += 1
        try:
            time.sleep(faults.write_delay_s)  # under the lease's lock, as the write is
            return super()._io(sector, views, write)
        finally:
            with faults.lock:
                faults.writing -= 1


class BlkType(DeviceType):
    name = "blk"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--disk", required=True, help="the disk image")
        parser.add_argument("--read-only", action="store_true")
        parser.add_argument("--journal", help="record writes and flushes (blk_journal.py)")

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.lease = WriteLease()
        self.holder: str | None = None
        self.faults = Faults()
        self.journal = None
        if args.journal:  # tests only: the journal's module is not imported otherwise
            from ..devices.virtio.blk_journal import WriteJournal

            self.journal = WriteJournal(args.journal)

    def create(self, name: str, partition: int, args: dict[str, object]) -> VirtioBlk:
        if args:
            raise ValueError(f"blk takes no front-end args ({sorted(args)})")
        disk, read_only = self.args.disk, self.args.read_only
        return BlkModel(
            self.faults, disk, read_only=read_only, lease=self.lease, journal=self.journal
        )

    def removed(self, name: str, model: VirtioBlk) -> None:  # type: ignore[override]
        if self.holder == name:
            self._grant(None)
        model.close()

    @control_op("lease")
    def op_lease(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        holder = request.get("holder")
        if holder is not None and holder not in self.models:
            raise ValueError(f"lease: no front-end {holder!r}")
        self._grant(holder)  # type: ignore[arg-type]
        return {"holder": holder}

    @control_op("fault")
    def op_fault(self, request: dict[str, object], fds: list[int]) -> dict[str, object]:
        failing = request.get("fail_io", {})
        if not isinstance(failing, dict) or not all(
            name in self.models and isinstance(on, bool) for name, on in failing.items()
        ):
            raise ValueError(f"fault: fail_io {failing!r} (front-end name: true or false)")
        if "write_delay_s" in request or not failing:
            delay = request.get("write_delay_s", 0.0)
            if not isinstance(delay, (int, float)) or not 0 <= delay <= MAX_WRITE_DELAY_S:
                raise ValueError(f"fault: write_delay_s {delay!r} (0 to {MAX_WRITE_DELAY_S})")
            self.faults.write_delay_s = float(delay)
        for name, on in failing.items():
            self.models[name].fail_io = on  # type: ignore[attr-defined]
        return {}

    def _grant(self, holder: str | None) -> None:
        self.lease.grant(None if holder is None else self.models[holder])  # type: ignore[arg-type]
        self.holder = holder

    def status(self) -> dict[str, object]:
        return {"lease": self.holder, "writing": self.faults.writing}


if __name__ == "__main__":
    sys.exit(run(BlkType))
