"""webkv-native under examples/kvload.py's clients: the anchor that downtime.py holds
pyvmm's stalls against (same webkv sources as a host process, same clients, same
disk place; guest_kernels/README.md, webkv-native)."""

from __future__ import annotations

import sys
import time

import harness
from common import ROOT
from webkv import serving

sys.path.insert(0, str(ROOT / "examples"))
from kvload import KvLoad, Sample


class NativeRun:
    """Segments of load against webkv-native; each starts a fresh server and disk,
    and ends with the server killed (SIGKILL) and every acknowledged write looked
    for on its disk image, as for pyvmm."""

    def __init__(
        self, workdir: str | None, clients: int, rate: float, pinning: harness.Pinning
    ) -> None:
        self.workdir, self.clients, self.rate, self.pinning = workdir, clients, rate, pinning
        self.segments: list[list[Sample]] = []
        self.failures: list[str] = []
        self.lost = self.acked = self.writes = 0
        self.seconds = 0.0

    def segment(self, seconds: float) -> list[Sample]:
        """One segment of ``seconds``; its samples."""
        with serving("native", self.workdir) as server:
            self.pinning.apply_load()  # the client processes inherit this
            load = KvLoad(server.port, self.clients, rate=self.rate).start()
            self.pinning.apply_measured()
            load.wait_started()
            time.sleep(seconds)
            load.stop()
            server.kill()
            self.lost += len(load.lost_on_disk(str(server.disk)))
        self.segments.append(load.samples)
        self.failures += load.failures
        self.acked += len(load.acked)
        self.writes += load.writes
        self.seconds += seconds
        return load.samples
