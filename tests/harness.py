"""A pyvmm process with its console read on a thread (and when each chunk arrived),
matched with time-outs; real-time priority and the tick-rate check for timing tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest


class GuestProcess:
    def __init__(
        self,
        args: Sequence[str],
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        program: Sequence[str] = (sys.executable, "-m", "pyvmm"),
        realtime: bool = False,
    ) -> None:
        """``program``: what runs with ``args`` (pyvmm, or another program such as
        build/webkv-native); ``realtime``: at real-time priority (``set_realtime``)."""
        self.args = [*program, *args]
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
            preexec_fn=set_realtime if realtime else None,
        )
        self._stdout = bytearray()
        self._stderr = bytearray()
        # (monotonic time a chunk of stdout arrived, bytes of stdout up to its end)
        self.arrivals: list[tuple[float, int]] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._stdout), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()

    def _pump(self, stream, buffer: bytearray) -> None:
        while chunk := stream.read1(65536):
            arrived = time.monotonic()
            with self._changed:
                buffer += chunk
                if buffer is self._stdout:
                    self.arrivals.append((arrived, len(buffer)))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        return self._stdout.decode(errors="replace")

    @property
    def raw_stdout(self) -> bytes:
        with self._changed:
            return bytes(self._stdout)

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace")

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until the console shows ``pattern``; fail with the console so far."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self.stdout)
                if match:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._alive()):
                    raise AssertionError(
                        f"console never showed {pattern!r} within {timeout}s; "
                        f"stdout={self.stdout!r} stderr={self.stderr!r}"
                    )
                self._changed.wait(min(remaining, 0.1))

    def arrived_at(self, offset: int) -> float:
        """When the byte of stdout at ``offset`` reached this process (monotonic s)."""
        with self._changed:
            return next(t for t, end in self.arrivals if end > offset)

    def _alive(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def wait(self, timeout: float = 20.0) -> int:
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"pyvmm did not exit within {timeout}s; stdout={self.stdout!r}"
            ) from None
        for reader in self._readers:
            reader.join(5)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def run_pyvmm(
    args: Sequence[str],
    stdin: bytes | None = None,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    realtime: bool = False,
) -> tuple[int, str, str]:
    with GuestProcess(args, stdin, env, realtime=realtime) as guest:
        status = guest.wait(timeout)
        return status, guest.stdout, guest.stderr


# ---- timing under host load -------------------------------------------------------------


def set_realtime() -> None:
    """This thread, and the threads and processes it starts from now on, at SCHED_FIFO
    priority 1, where the host allows it (else unchanged).

    For tests that time a guest's interrupts: a vCPU thread that waits for a host CPU
    when its timer fires takes the interrupt late, and one that waits longer than a
    period has that tick merged into the next by KVM (counted 67-95 of 100 ticks at
    load 5-15 on 2 CPUs). That measures the host's run queue, not pyvmm; a real-time
    vCPU thread is woken at once (100 of 100 at load 15). Use it only for guests that
    halt between interrupts: a real-time thread that spins holds its CPU (the kernel
    throttles it at 95%).
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        pass  # not permitted here: the test runs at normal priority


@contextmanager
def realtime() -> Iterator[None]:
    """``set_realtime`` for this thread (and the threads it starts) while in the block."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    set_realtime()
    try:
        yield
    finally:
        os.sched_setscheduler(0, before[0], before[1])


def assert_tick_rate(ticks: int, hz: int, elapsed_s: float) -> None:
    """``ticks`` of a timer at ``hz`` over ``elapsed_s`` by the guest's clock: the rate
    within 5% (2 ticks at the ends, where a tick may fall just inside or outside)."""
    assert ticks == pytest.approx(hz * elapsed_s, rel=0.05, abs=2), (ticks, hz, elapsed_s)
