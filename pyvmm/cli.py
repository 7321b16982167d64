"""The ``pyvmm`` command line (typer). The console script enters through
``launcher.main``, which runs plain ``boot`` invocations without importing typer."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

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
) -> None:
    """Boot KERNEL on one vCPU. The guest console is this process's stdin/stdout, and
    the process exits with the code the guest writes to the debug-exit port (0xf4)."""
    raise typer.Exit(run_boot(kernel, mem, cmdline, timeout, control, disk, forward))


# --- pyvmm ctl PATH ... ------------------------------------------------------------------

JsonOption = Annotated[bool, typer.Option("--json", help="print the JSON reply")]


class _Target:
    path = ""


@ctl.callback()
def ctl_callback(path: Annotated[str, typer.Argument(help="the node's control socket")]) -> None:
    _Target.path = path


def _send(
    op: str,
    as_json: bool,
    path: str | None = None,
    on_progress: Any = None,
    **arguments: Any,
) -> dict[str, Any]:
    """One control request; errors become one line on stderr and exit status 1."""
    from .control import request
    from .errors import PyvmmError

    try:
        reply = request(path or _Target.path, op, on_progress=on_progress, **arguments)
    except PyvmmError as exc:
        typer.echo(f"pyvmm: error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(reply))
    if not reply.get("ok"):
        if not as_json:
            typer.echo(f"pyvmm: error: {reply.get('error')}", err=True)
        raise typer.Exit(1)
    return reply


def _say(as_json: bool, line: str) -> None:
    if not as_json:
        typer.echo(line)


@ctl.command()
def status(as_json: JsonOption = False) -> None:
    """Mode, instances, switch and exit counts."""
    reply = _send("status", as_json)
    if as_json:
        return
    s = reply["result"]
    typer.echo(f"mode: {s['mode']}  current: {s['current']}")
    for i in s["instances"]:
        typer.echo(
            f"  {i['name']}: {i['status']}, partition {i['partition']} "
            f"[{i['base']:#x}+{i['size'] >> 20} MiB], devices {', '.join(i['devices']) or '-'}"
        )
    lat = s["switch_latency_us"]
    typer.echo(
        f"switches: {s['switches']}  exits: {s['exits']}  switch latency us: "
        f"p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} max {lat['max']}"
    )


@ctl.command()
def virtualize(as_json: JsonOption = False) -> None:
    """Trap the running instance: the node becomes virtualized."""
    _send("virtualize", as_json)
    _say(as_json, "virtualized")


@ctl.command()
def devirtualize(as_json: JsonOption = False) -> None:
    """Leave the one remaining instance running alone on the vCPU."""
    _send("devirtualize", as_json)
    _say(as_json, "devirtualized")


@ctl.command()
def start(
    kernel: Annotated[str, typer.Argument(help="PVH kernel for the new instance")],
    name: Annotated[str | None, typer.Option(help="instance name")] = None,
    cmdline: Annotated[str, typer.Option(help="its command line")] = "console=ttyS1",
    device: Annotated[
        list[str] | None, typer.Option(help="a device it owns from the start (repeatable)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Boot a second instance into the spare partition."""
    reply = _send("start", as_json, kernel=kernel, name=name, cmdline=cmdline, devices=device or [])
    i = reply["result"]
    _say(as_json, f"started {i['name']} in partition {i['partition']}")


@ctl.command()
def stop(name: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Retire an instance."""
    _send("stop", as_json, name=name)
    _say(as_json, f"stopped {name}")


@ctl.command()
def pause(name: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Stop scheduling an instance; its interrupts wait until it is resumed."""
    _send("pause", as_json, name=name)
    _say(as_json, f"paused {name}")


@ctl.command()
def resume(name: Annotated[str, typer.Argument()], as_json: JsonOption = False) -> None:
    """Schedule a paused instance again."""
    _send("resume", as_json, name=name)
    _say(as_json, f"resumed {name}")


@ctl.command()
def move(
    device: Annotated[str, typer.Argument()],
    to: Annotated[str, typer.Argument(metavar="NAME")],
    as_json: JsonOption = False,
) -> None:
    """Give DEVICE to instance NAME."""
    _send("move", as_json, device=device, to=to)
    _say(as_json, f"moved {device} to {to}")


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
    as_json: JsonOption = False,
) -> None:
    """Upgrade the running instance online to the kernel given by --to."""
    import os
    import time

    # This process only watches: at the hand-off its printing and exit must not take
    # a core from the service (on a two-core node that shows as client stalls).
    os.nice(10)
    started = time.monotonic()
    timeouts: dict[str, float] = {}
    for item in timeout or ():
        phase, _, seconds = item.partition("=")
        try:
            timeouts[phase] = float(seconds)
        except ValueError:
            raise typer.BadParameter(f"--timeout {item!r}: expected PHASE=SECONDS") from None

    def show(update: dict[str, Any]) -> None:
        if not as_json and update["state"] != "start":
            elapsed = time.monotonic() - started
            typer.echo(
                f"[{elapsed:7.3f}s] {update['phase']:<13} {update['state']:<6} "
                f"{update['seconds'] * 1000:9.1f} ms",
                err=True,
            )

    arguments: dict[str, Any] = {"kernel": to, "cmdline": cmdline}
    if inject:
        arguments["inject"] = inject
    if timeouts:
        arguments["timeouts"] = timeouts
    reply = _send("upgrade", as_json, path=control, on_progress=show, **arguments)
    report = reply["result"]
    if not as_json:
        phases = ", ".join(f"{p['phase']} {p['seconds'] * 1000:.1f} ms" for p in report["phases"])
        if report["ok"]:
            typer.echo(
                f"upgraded {report['before']} -> {report['after']} in "
                f"{report['total_s'] * 1000:.0f} ms ({phases})"
            )
        else:
            typer.echo(
                f"rolled back: {report['failed_phase']}: {report['reason']}; still "
                f"{report['before']} ({phases})"
            )
    if not report["ok"]:
        raise typer.Exit(3)
