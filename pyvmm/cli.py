"""The ``pyvmm`` command line (typer). The console script enters through
``launcher.main``, which runs plain ``boot`` invocations without importing typer."""

from __future__ import annotations

from typing import Annotated

import typer

from .launcher import run_boot

app = typer.Typer(
    help="pyvmm: a devirtualizable VMM on Linux KVM, for single-node online maintenance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    raise typer.Exit(run_boot(kernel, mem, cmdline, timeout))
