"""Entry point of the ``pyvmm`` command.

``pyvmm boot`` is timed against QEMU's whole-process boot, and importing typer (with
the click, rich and pydantic it brings) takes longer than QEMU's entire run. So a
``boot`` invocation that uses only the documented options is parsed here and run
without importing typer; anything else (help, other commands, mistakes) goes to the
typer app in ``cli.py``. Both paths call ``run_boot``, and a test checks that the two
parsers agree on every option.
"""

from __future__ import annotations

import sys

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


def parse_boot_args(argv: list[str]) -> dict[str, object] | None:
    """The arguments of a plain ``boot`` command line, or None to let typer handle it."""
    if not argv or argv[0] != "boot":
        return None
    values = {name: default for name, _, default in BOOT_OPTIONS.values()}
    kernel = None
    args = iter(argv[1:])
    for arg in args:
        option, eq, inline = arg.partition("=")
        if option in BOOT_OPTIONS:
            name, convert, _ = BOOT_OPTIONS[option]
            raw = inline if eq else next(args, None)
            if raw is None:
                return None
            try:
                values[name] = convert(raw)
            except ValueError:
                return None
        elif arg.startswith("-") or kernel is not None:
            return None
        else:
            kernel = arg
    if kernel is None:
        return None
    return {"kernel": kernel, **values}


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
) -> int:
    """``pyvmm boot``: returns the process exit status.

    With ``control``, the node is armed for maintenance: a spare partition of the
    same size, a vsock device per partition and a control socket. ``disk`` and
    ``forward`` add the service devices (virtio-blk, host ports to guest vsock ports).
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

    partitions = 2 if control else 1
    services = None
    try:
        with Machine(size * partitions, partitions=partitions) as machine:
            if control or disk or forward:
                from .node import add_service_devices, parse_forward

                forwards = tuple(parse_forward(f) for f in forward or ())
                services = add_service_devices(machine, disk, forwards)
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
    from .console import start_stdin_feeder
    from .control import ControlServer
    from .microvisor import Microvisor

    microvisor = Microvisor(machine)
    microvisor.boot(kernel, cmdline)
    start_stdin_feeder(machine.com1)
    server = ControlServer(control, microvisor, services)
    try:
        return microvisor.run(timeout)
    finally:
        server.close()


def main() -> None:
    request = parse_boot_args(sys.argv[1:])
    try:
        if request is not None:
            sys.exit(run_boot(**request))  # type: ignore[arg-type]
        from .cli import app

        app()
    except KeyboardInterrupt:
        sys.exit(130)
