"""A pyvmm process with its console read on a thread and matched with time-outs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


class GuestProcess:
    def __init__(
        self,
        args: Sequence[str],
        stdin: bytes | None = None,
        env: dict[str, str] | None = None,
        program: Sequence[str] = (sys.executable, "-m", "pyvmm"),
    ) -> None:
        """``program``: what runs with ``args`` (pyvmm, or another program such as
        build/webkv-native)."""
        self.args = [*program, *args]
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self._stdout = bytearray()
        self._stderr = bytearray()
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
            with self._changed:
                buffer += chunk
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        return self._stdout.decode(errors="replace")

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
) -> tuple[int, str, str]:
    with GuestProcess(args, stdin, env) as guest:
        status = guest.wait(timeout)
        return status, guest.stdout, guest.stderr
