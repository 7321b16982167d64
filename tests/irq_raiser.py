"""Interrupt sources for the interrupt tests: a line raised by the VMM itself
(``VmmCaller``: ``IrqfdLine.trigger``, as an in-VMM back-end does) or by another
process writing the line's eventfd (``ProcessCaller``: as a back-end process writes
its vhost-user call fd, which the VMM never sees devirtualized). Each ``call()``
returns the host TSC just before and just after the raise.

Run as a script, this module is that other process: one eventfd write per byte read
on stdin, answered with the two TSC values.
"""

from __future__ import annotations

import os
import subprocess
import sys

from irq_audit import host_tsc

from pyvmm.lines import IrqfdLine


class VmmCaller:
    def __init__(self, line: IrqfdLine) -> None:
        self.line = line

    def call(self) -> tuple[int, int]:
        before = host_tsc()
        self.line.trigger()
        return before, host_tsc()

    def close(self) -> None:
        pass


class ProcessCaller:
    def __init__(self, line: IrqfdLine) -> None:
        self.line = line
        line.external = True  # as the machine marks a back-end process's line
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(line.fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(line.fd,),
        )

    def call(self) -> tuple[int, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"r")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert len(answer) == 2, f"the raising process ended ({self.proc.poll()})"
        return int(answer[0]), int(answer[1])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


CALLERS = {"thread": VmmCaller, "process": ProcessCaller}


def main() -> None:
    fd = int(sys.argv[1])
    stdin = sys.stdin.buffer.raw
    while stdin.read(1):
        before = host_tsc()
        os.eventfd_write(fd, 1)
        after = host_tsc()
        sys.stdout.write(f"{before} {after}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
