"""The virtio-blk back-end process: ``python -m pyvmm.backends.blk --control PATH
--disk FILE [--read-only] [--parent PID]``, one per disk, serving the front-end of
every partition (``host``).

Each front-end's requests are served by the in-process device model itself
(``devices.virtio.blk.VirtioBlk``: request parsing, I/O, worker thread, unchanged)
over the vhost-user rings. All of them share one ``WriteLease``, inside this process,
held by no front-end at first: every front-end may read, only the holder may write,
and a write by any other fails with IOERR.

Control op ``lease`` {"holder": NAME or null} moves it and replies once the
previous holder can write no more (a write in progress finishes first: ``grant``
takes the lock every write holds). The reply says who holds it.
"""

from __future__ import annotations

import argparse
import sys

from ..devices.virtio.blk import VirtioBlk, WriteLease
from .host import DeviceType, control_op, run


class BlkType(DeviceType):
    name = "blk"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--disk", required=True, help="the disk image")
        parser.add_argument("--read-only", action="store_true")

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.lease = WriteLease()
        self.holder: str | None = None

    def create(self, name: str, partition: int, args: dict[str, object]) -> VirtioBlk:
        if args:
            raise ValueError(f"blk takes no front-end args ({sorted(args)})")
        return VirtioBlk(self.args.disk, read_only=self.args.read_only, lease=self.lease)

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

    def _grant(self, holder: str | None) -> None:
        self.lease.grant(None if holder is None else self.models[holder])  # type: ignore[arg-type]
        self.holder = holder

    def status(self) -> dict[str, object]:
        return {"lease": self.holder}


if __name__ == "__main__":
    sys.exit(run(BlkType))
