"""Entry point of the ``pyvmm`` command.

``pyvmm boot`` is timed against QEMU's whole-process boot, and importing typer (with
the click, rich and pydantic it brings) takes longer than QEMU's entire run; ``pyvmm
ctl`` and ``pyvmm upgrade`` are called per node by fleet tools. So a ``boot``, ``ctl``
or ``upgrade`` invocation that uses only the documented options is parsed here and
run without importing typer; anything else (help, mistakes) goes to the typer app in
``cli.py``. Both paths call the same functions (``run_boot``, ``ctl.run_ctl``,
``ctl.run_upgrade``), and a test checks that the two parsers agree on every option.
"""

from __future__ import annotations

import sys

from .backends import DEVICE_BACKENDS, DEVICE_BACKENDS_ENV, default_device_backends

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .machine import Machine, RunResult
    from .node import ServiceDevices

# option → (parameter name, converter, default); mirrored by cli.boot's signature.
BOOT_OPTIONS: dict[str, tuple[str, type, object]] = {
    "--mem": ("mem", str, "256M"),
    "--cmdline": ("cmdline", str, "console=ttyS0"),
    "--timeout": ("timeout", float, None),
    "--control": ("control", str, None),
    "--disk": ("disk", str, None),
    "--forward": ("forward", list, None),
    "--device-backends": ("device_backends", str, default_device_backends()),
}

_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
EX_USAGE = 2


def parse_size(text: str) -> int:
    """'256M', '1G', '512MiB' → bytes. A bare number means MiB, as in QEMU's -m."""
    # Parsed by hand: `re` would cost boot time (see record.py).
    body = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = body[-1:] if body[-1:] in ("K", "M", "G", "T") else ""
    digits = body[: len(body) - len(unit)].strip()
    if not digits.isdigit() or not digits.isascii():
        raise ValueError(f"{text!r} is not a size like 256M or 1G")
    return int(digits) * _UNITS[unit]


def _parse(
    args: list[str], positional: tuple[str, ...], options: dict[str, tuple[str, type, object]]
) -> dict[str, object] | None:
    """Positional arguments and options as typer would take them, or None for anything
    this plain parser does not cover (typer then parses it, or explains the mistake).
    An option's converter ``bool`` marks a flag, ``list`` a repeatable option."""
    values = {name: [] if kind is list else default for name, kind, default in options.values()}
    given: list[str] = []
    rest = iter(args)
    for arg in rest:
        option, eq, inline = arg.partition("=")
        if option in options:
            name, convert, _ = options[option]
            if convert is bool:
                if eq:
                    return None
                values[name] = True
                continue
            raw = inline if eq else next(rest, None)
            if raw is None:
                return None
            if convert is list:
                values[name].append(raw)  # type: ignore[union-attr]
                continue
            try:
                values[name] = convert(raw)
            except ValueError:
                return None
        elif arg.startswith("-") or len(given) == len(positional):
            return None
        else:
            given.append(arg)
    if len(given) != len(positional):
        return None
    return {**dict(zip(positional, given, strict=True)), **values}


def parse_boot_args(argv: list[str]) -> dict[str, object] | None:
    """The arguments of a plain ``boot`` command line, or None to let typer handle it."""
    if not argv or argv[0] != "boot":
        return None
    return _parse(argv[1:], ("kernel",), BOOT_OPTIONS)


JSON_OPTION: dict[str, tuple[str, type, object]] = {"--json": ("as_json", bool, False)}
# ``pyvmm ctl PATH COMMAND ...``: command → (positional arguments, options); mirrored by
# the typer commands in cli.py (tests/test_launcher.py checks both ways).
CTL_COMMANDS: dict[str, tuple[tuple[str, ...], dict[str, tuple[str, type, object]]]] = {
    "status": ((), JSON_OPTION),
    "preflight": (("kernel",), {"--cmdline": ("cmdline", str, ""), **JSON_OPTION}),
    "virtualize": ((), JSON_OPTION),
    "devirtualize": ((), JSON_OPTION),
    "start": (
        ("kernel",),
        {
            "--name": ("name", str, None),
            "--cmdline": ("cmdline", str, ""),
            "--device": ("devices", list, None),
            **JSON_OPTION,
        },
    ),
    "stop": (("name",), JSON_OPTION),
    "pause": (("name",), JSON_OPTION),
    "resume": (("name",), JSON_OPTION),
    "move": (("device", "to"), JSON_OPTION),
}
UPGRADE_OPTIONS: dict[str, tuple[str, type, object]] = {
    "--to": ("to", str, None),
    "--cmdline": ("cmdline", str, ""),
    "--inject": ("inject", str, None),
    "--timeout": ("timeout", list, None),
    "--force": ("force", bool, False),
    **JSON_OPTION,
}


def parse_ctl_args(argv: list[str]) -> tuple[str, dict[str, object]] | None:
    """A plain ``ctl`` or ``upgrade`` command line → (the function of ``pyvmm.ctl`` to
    call, its arguments), or None to let typer handle it."""
    if argv[:1] == ["ctl"] and len(argv) >= 3 and not argv[1].startswith("-"):
        command = CTL_COMMANDS.get(argv[2])
        parsed = command and _parse(argv[3:], *command)
        if not parsed:
            return None
        return "run_ctl", {"path": argv[1], "command": argv[2], **parsed}
    if argv[:1] == ["upgrade"]:
        parsed = _parse(argv[1:], ("control",), UPGRADE_OPTIONS)
        if parsed is None or parsed["to"] is None:
            return None
        from .ctl import parse_timeouts

        try:
            parsed["timeouts"] = parse_timeouts(parsed.pop("timeout"))  # type: ignore[arg-type]
        except ValueError:
            return None
        return "run_upgrade", parsed
    return None


def error(message: str) -> None:
    sys.stderr.write(f"pyvmm: error: {message}\n")
    sys.stderr.flush()


def run_boot(
    kernel: str,
    mem: str,
    cmdline: str,
    timeout: float | None,
    control: str | None = None,
    disk: str | None = None,
    forward: list[str] | None = None,
    device_backends: str | None = None,
) -> int:
    """``pyvmm boot``: returns the process exit status.

    With ``control``, the node is armed for maintenance: a spare partition of the
    same size, a vsock device per partition and a control socket. ``disk`` and
    ``forward`` add the service devices (virtio-blk, host ports to guest vsock ports);
    ``device_backends="process"`` serves them from back-end processes (vhost-user);
    None: ``PYVMM_DEVICE_BACKENDS`` or the default (``backends.default_device_backends``).
    """
    try:
        size = parse_size(mem)
    except ValueError as exc:
        error(f"--mem: {exc}")
        return EX_USAGE
    if timeout is not None and timeout <= 0:
        error("--timeout must be positive")
        return EX_USAGE
    from .console import start_stdin_feeder
    from .errors import EX_SOFTWARE, PyvmmError
    from .machine import Machine

    device_backends = device_backends or default_device_backends()
    if device_backends not in DEVICE_BACKENDS:
        error(
            f"--device-backends (or {DEVICE_BACKENDS_ENV}) {device_backends!r}: "
            f"{' or '.join(DEVICE_BACKENDS)}"
        )
        return EX_USAGE
    partitions = 2 if control else 1
    services = None
    # guest RAM is a memfd only where back-end processes will map it
    shared = device_backends == "process" and bool(control or disk or forward)
    try:
        with Machine(size * partitions, partitions=partitions, shared_memory=shared) as machine:
            if control or disk or forward:
                from .node import add_service_devices, parse_forward

                forwards = tuple(parse_forward(f) for f in forward or ())
                services = add_service_devices(machine, disk, forwards, device_backends)
            if control:
                result = _run_armed(machine, kernel, cmdline, timeout, control, services)
            else:
                machine.boot(kernel, cmdline)
                start_stdin_feeder(machine.com1)
                result = machine.run(timeout)
            if services is not None:
                services.close()
    except PyvmmError as exc:
        error(str(exc))
        return exc.exit_status
    except OSError as exc:  # a KVM ioctl failed: report it, no traceback
        error(f"KVM: {exc}")
        return EX_SOFTWARE
    if not result.guest_exited:
        error(result.message)
        if result.registers:
            sys.stderr.write(result.registers + "\n")
    return result.status


def _run_armed(
    machine: Machine,
    kernel: str,
    cmdline: str,
    timeout: float | None,
    control: str,
    services: ServiceDevices | None,
) -> RunResult:
    from os import environ

    from .console import start_stdin_feeder
    from .control import ControlServer
    from .microvisor import Microvisor

    # PYVMM_ISOLATION=none|protect-first is for measuring what isolation costs
    # (benchmarks/downtime.py --isolation); the default is symmetric.
    microvisor = Microvisor(machine, isolation=environ.get("PYVMM_ISOLATION", "symmetric"))
    microvisor.boot(kernel, cmdline)
    start_stdin_feeder(machine.com1)
    server = ControlServer(control, microvisor, services)
    try:
        return microvisor.run(timeout)
    finally:
        server.close()


def main() -> None:
    argv = sys.argv[1:]
    try:
        request = parse_boot_args(argv)
        if request is not None:
            sys.exit(run_boot(**request))  # type: ignore[arg-type]
        command = parse_ctl_args(argv)
        if command is not None:
            from . import ctl

            function, arguments = command
            sys.exit(getattr(ctl, function)(**arguments))
        from .cli import app

        app()
    except KeyboardInterrupt:
        sys.exit(130)
