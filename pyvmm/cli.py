"""The ``pyvmm`` command line."""

from __future__ import annotations

import re
import sys
from typing import Annotated

import typer

from .errors import PyvmmError

app = typer.Typer(
    help="pyvmm: a devirtualizable VMM on Linux KVM, for single-node online maintenance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'256M', '1G', '512MiB' → bytes. A bare number means MiB, as in QEMU's -m."""
    match = _SIZE.match(text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a size like 256M or 1G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def fail(message: str, status: int) -> typer.Exit:
    typer.echo(f"pyvmm: error: {message}", err=True)
    return typer.Exit(status)


@app.callback()
def main_callback() -> None:
    """pyvmm: a devirtualizable VMM on Linux KVM."""


@app.command()
def boot(
    kernel: Annotated[str, typer.Argument(help="PVH kernel image (ELF with a Xen PVH note)")],
    mem: Annotated[str, typer.Option(help="guest RAM, e.g. 256M or 1G")] = "256M",
    cmdline: Annotated[str, typer.Option(help="kernel command line")] = "console=ttyS0",
    timeout: Annotated[
        float | None, typer.Option(help="stop the guest after this many seconds")
    ] = None,
) -> None:
    """Boot KERNEL on one vCPU. The guest console is this process's stdin/stdout, and
    the process exits with the code the guest writes to the debug-exit port (0xf4)."""
    from .machine import Machine, start_stdin_feeder

    try:
        size = parse_size(mem)
    except typer.BadParameter as exc:
        raise fail(str(exc), 2) from None
    if timeout is not None and timeout <= 0:
        raise fail("--timeout must be positive", 2)
    try:
        with Machine(size) as machine:
            machine.boot(kernel, cmdline)
            start_stdin_feeder(machine.com1)
            result = machine.run(timeout)
    except PyvmmError as exc:
        raise fail(str(exc), exc.exit_status) from None
    except OSError as exc:  # a KVM ioctl failed: report it, no traceback
        raise fail(f"KVM: {exc}", 70) from None
    if not result.guest_exited:
        typer.echo(f"pyvmm: error: {result.message}", err=True)
        if result.registers:
            typer.echo(result.registers, err=True)
    raise typer.Exit(result.status)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
