"""The ``pyvmm`` command line (typer). The console script enters through
``launcher.main``, which runs plain ``boot``, ``ctl`` and ``upgrade`` invocations
without importing typer; the commands here call the same functions (``run_boot``,
``ctl.run_ctl``, ``ctl.run_upgrade``)."""

from __future__ import annotations

from typing import Annotated

import typer

from .backends import DEVICE_BACKENDS_ENV, default_device_backends
from .ctl import parse_timeouts, run_ctl, run_upgrade
from .launcher import run_boot

app = typer.Typer(
    help="pyvmm: a devirtualizable VMM on Linux KVM, for single-node online maintenance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ctl = typer.Typer(help="Talk to a running node through its control socket.", no_args_is_help=True)
app.add_typer(ctl, name="ctl")


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
    control: Annotated[
        str | None,
        typer.Option(help="arm the microvisor: a spare partition and a control socket here"),
    ] = None,
    disk: Annotated[
        str | None, typer.Option(help="a file to attach as a virtio-blk disk (blk0)")
    ] = None,
    forward: Annotated[
        list[str] | None,
        typer.Option(
            help="[HOST:]PORT=GUEST_PORT: forward a host TCP port to a guest vsock "
            "port (repeatable)"
        ),
    ] = None,
    device_backends: Annotated[
        str,
        typer.Option(
            help="where the service devices' back-ends run: thread (in the VMM) or "
            f"process (vhost-user); the default comes from {DEVICE_BACKENDS_ENV} if set"
        ),
    ] = default_device_backends(),
) -> None:
    """Boot KERNEL on one vCPU. The guest console is this process's stdin/stdout, and
    the process exits with the code the guest writes to the debug-exit port (0xf4)."""
    status = run_boot(kernel, mem, cmdline, timeout, control, disk, forward, device_backends)
    raise typer.Exit(status)


# --- pyvmm ctl PATH ... ------------------------------------------------------------------

JsonOption = Annotated[bool, typer.Option("--json", help="print the JSON reply")]


class _Target:
    path = ""


@ctl.callback()
def ctl_callback(path: Annotated[str, typer.Argument(help="the node's control socket")]) -> None:
    _Target.path = path


def _ctl(command: str, as_json: bool, **arguments: object) -> None:
    raise typer.Exit(run_ctl(_Target.path, command, as_json, **arguments))


@ctl.command()
def status(as_json: JsonOption = False) -> None:
    """Mode, instances (with kernel hash and command line), switch and exit counts."""
    _ctl("status", as_json)


@ctl.command()
def preflight(
    kernel: Annotated[str, typer.Argument(help="the kernel an upgrade would boot")],
    cmdline: Annotated[str, typer.Option(help="the upgrade's extra command-line words")] = "",
    as_json: JsonOption = False,
) -> None:
    """Check that an upgrade to KERNEL could start now; changes nothing (exit 1 if not)."""
    _ctl("preflight", as_json, kernel=kernel, cmdline=cmdline)


@ctl.command()
def virtualize(as_json: JsonOption = False) -> None:
    """Trap the running instance: the node becomes virtualized."""
    _ctl("virtualize", as_json)


@ctl.command()
def devirtualize(as_json: JsonOption = False) -> None:
    """Leave the one remaining instance running alone on the vCPU."""
    _ctl("devirtualize", as_json)


@ctl.command()
def start(
    kernel: Annotated[str, typer.Argument(help="PVH kernel for the new instance")],
    name: Annotated[str | None, typer.Option(help="instance name")] = None,
    cmdline: Annotated[
        str, typer.Option(help="its command line (console=ttyS<partition> is added unless given)")
    ] = "",
    devices: Annotated[
        list[str] | None,
        typer.Option("--device", help="a device it owns from the start (repeatable)"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Boot a second instance into the spare partition."""
    _ctl("start", as_json, kernel=kernel, name=name, cmdline=cmdline, devices=devices or [])


@ctl.command()
def stop(name: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Retire an instance."""
    _ctl("stop", as_json, name=name)


@ctl.command()
def pause(name: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Stop scheduling an instance; its interrupts wait until it is resumed."""
    _ctl("pause", as_json, name=name)


@ctl.command()
def resume(name: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Schedule a paused instance again."""
    _ctl("resume", as_json, name=name)


@ctl.command()
def move(
    device: Annotated[str, typer.Argument()],
    to: Annotated[str, typer.Argument(metavar="NAME")],
    as_json: JsonOption = False,
) -> None:
    """Give DEVICE to instance NAME."""
    _ctl("move", as_json, device=device, to=to)


@app.command()
def upgrade(
    control: Annotated[str, typer.Argument(help="the node's control socket")],
    to: Annotated[str, typer.Option("--to", help="the new kernel")],
    cmdline: Annotated[str, typer.Option(help="extra command-line words for it")] = "",
    inject: Annotated[
        str | None, typer.Option(help="a fault to inject, for tests and demos")
    ] = None,
    timeout: Annotated[
        list[str] | None,
        typer.Option(
            "--timeout",
            metavar="PHASE=SECONDS",
            help="a phase time-out: ready, release or acquire (repeatable)",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="if the old instance hangs in its release, fence it and go on (no rollback)",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Upgrade the running instance online to the kernel given by --to (exit 3: rolled
    back)."""
    try:
        timeouts = parse_timeouts(timeout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    raise typer.Exit(run_upgrade(control, to, cmdline, inject, timeouts, as_json, force))
