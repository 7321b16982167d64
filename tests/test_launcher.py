"""The lean ``boot`` parser must agree with the typer CLI it stands in for."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from pyvmm import cli, launcher
from pyvmm.backends import DEFAULT_DEVICE_BACKENDS, DEVICE_BACKENDS_ENV


def typer_boot_arguments(monkeypatch, argv: list[str]) -> dict[str, object] | None:
    seen: dict[str, object] = {}

    def fake_run_boot(
        kernel, mem, cmdline, timeout, control, disk=None, forward=None, device_backends="thread"
    ):
        seen.update(kernel=kernel, mem=mem, cmdline=cmdline, timeout=timeout, control=control)
        seen.update(disk=disk, forward=list(forward or []), device_backends=device_backends)
        return 0

    monkeypatch.setattr(cli, "run_boot", fake_run_boot)
    result = CliRunner().invoke(cli.app, argv)
    return seen if result.exit_code == 0 and seen else None


@pytest.mark.parametrize(
    "argv",
    [
        ["boot", "k.elf"],
        ["boot", "k.elf", "--mem", "1G"],
        ["boot", "--mem=64M", "k.elf", "--cmdline", "console=ttyS1 a=b", "--timeout", "2.5"],
        ["boot", "k.elf", "--timeout=3"],
        ["boot", "k.elf", "--cmdline="],
        ["boot", "k.elf", "--control", "/tmp/node.sock", "--timeout", "9"],
        ["boot", "k.elf", "--disk", "d.img", "--forward", "8080=80", "--forward=1.2.3.4:81=81"],
        ["boot", "k.elf", "--disk=d.img", "--device-backends", "process", "--control", "n"],
    ],
)
def test_fast_parser_matches_typer(monkeypatch, argv):
    assert launcher.parse_boot_args(argv) == typer_boot_arguments(monkeypatch, argv)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--help"],
        ["boot"],
        ["boot", "--help"],
        ["boot", "k.elf", "--timeout"],
        ["boot", "k.elf", "--timeout", "soon"],
        ["boot", "k.elf", "extra"],
        ["boot", "k.elf", "--unknown", "1"],
        ["boot", "k.elf", "--disk"],
        ["boot", "k.elf", "--forward"],
    ],
)
def test_anything_unusual_goes_to_typer(argv):
    assert launcher.parse_boot_args(argv) is None


def test_options_mirror_the_typer_command():
    command = typer.main.get_command(cli.app)
    boot = command.commands["boot"]  # type: ignore[attr-defined]
    params = {p.name: p for p in boot.params if p.param_type_name == "option"}
    assert set(params) == {name for name, _, _ in launcher.BOOT_OPTIONS.values()}
    for option, (name, _, default) in launcher.BOOT_OPTIONS.items():
        assert option in params[name].opts
        assert params[name].default == default


DEFAULTS_SCRIPT = """
import typer
from pyvmm import cli, launcher
from pyvmm.backends import DEFAULT_DEVICE_BACKENDS, DEVICE_BACKENDS_ENV
boot = typer.main.get_command(cli.app).commands["boot"]
typer_default = next(p.default for p in boot.params if p.name == "device_backends")
print(launcher.parse_boot_args(["boot", "k.elf"])["device_backends"], typer_default)
"""


@pytest.mark.parametrize("env", ["process", "thread", ""])
def test_device_backends_default_comes_from_the_environment(env):
    """PYVMM_DEVICE_BACKENDS sets --device-backends' default, the same on both paths."""
    environ = {k: v for k, v in os.environ.items() if k != DEVICE_BACKENDS_ENV}
    if env:
        environ[DEVICE_BACKENDS_ENV] = env
    out = subprocess.run(
        [sys.executable, "-c", DEFAULTS_SCRIPT], env=environ, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [env or DEFAULT_DEVICE_BACKENDS] * 2


def test_a_bad_device_backends_value_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv(DEVICE_BACKENDS_ENV, "fibers")
    assert launcher.run_boot("k.elf", "256M", "", None) == launcher.EX_USAGE
    assert f"{DEVICE_BACKENDS_ENV}) 'fibers'" in capsys.readouterr().err


def test_parse_size():
    assert launcher.parse_size("256M") == 256 << 20
    assert launcher.parse_size("1G") == 1 << 30
    assert launcher.parse_size("512MiB") == 512 << 20
    assert launcher.parse_size("64") == 64 << 20
    with pytest.raises(ValueError, match="not a size"):
        launcher.parse_size("lots")


# --- ctl and upgrade: the same agreement ------------------------------------------------


def typer_ctl_call(monkeypatch, argv: list[str]) -> tuple[str, dict[str, object]] | None:
    """What the typer app would call for ``argv``: (function name, arguments)."""
    seen: list[tuple[str, dict[str, object]]] = []

    def fake_run_ctl(path, command, as_json=False, **arguments):
        seen.append(
            ("run_ctl", {"path": path, "command": command, "as_json": as_json, **arguments})
        )
        return 0

    def fake_run_upgrade(
        control, to, cmdline="", inject=None, timeouts=None, as_json=False, force=False
    ):
        arguments = {"control": control, "to": to, "cmdline": cmdline, "inject": inject}
        seen.append(
            ("run_upgrade", {**arguments, "timeouts": timeouts, "as_json": as_json, "force": force})
        )
        return 0

    monkeypatch.setattr(cli, "run_ctl", fake_run_ctl)
    monkeypatch.setattr(cli, "run_upgrade", fake_run_upgrade)
    result = CliRunner().invoke(cli.app, argv)
    return seen[0] if result.exit_code == 0 and seen else None


@pytest.mark.parametrize(
    "argv",
    [
        ["ctl", "/tmp/n.sock", "status"],
        ["ctl", "/tmp/n.sock", "status", "--json"],
        ["ctl", "/tmp/n.sock", "preflight", "k.elf"],
        ["ctl", "/tmp/n.sock", "preflight", "k.elf", "--cmdline", "a=b c", "--json"],
        ["ctl", "/tmp/n.sock", "virtualize"],
        ["ctl", "/tmp/n.sock", "devirtualize", "--json"],
        ["ctl", "/tmp/n.sock", "start", "k.elf"],
        ["ctl", "/tmp/n.sock", "start", "k.elf", "--name", "b", "--device", "blk0"],
        ["ctl", "/tmp/n.sock", "start", "--device=a", "k.elf", "--device", "b", "--cmdline="],
        ["ctl", "/tmp/n.sock", "stop", "b"],
        ["ctl", "/tmp/n.sock", "pause", "a", "--json"],
        ["ctl", "/tmp/n.sock", "resume", "a"],
        ["ctl", "/tmp/n.sock", "move", "blk0", "b"],
        ["upgrade", "/tmp/n.sock", "--to", "v2.elf"],
        ["upgrade", "/tmp/n.sock", "--to=v2.elf", "--json", "--cmdline", "x=1"],
        ["upgrade", "/tmp/n.sock", "--to", "v2.elf", "--inject", "boot-fails"],
        ["upgrade", "/tmp/n.sock", "--to", "v2.elf", "--force"],
        ["upgrade", "--timeout", "acquire=2", "/tmp/n.sock", "--to", "k", "--timeout=ready=1.5"],
    ],
)
def test_fast_ctl_parser_matches_typer(monkeypatch, argv):
    fast = launcher.parse_ctl_args(argv)
    assert fast is not None
    assert fast == typer_ctl_call(monkeypatch, argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["ctl"],
        ["ctl", "--help"],
        ["ctl", "/tmp/n.sock"],
        ["ctl", "/tmp/n.sock", "status", "--help"],
        ["ctl", "/tmp/n.sock", "status", "extra"],
        ["ctl", "/tmp/n.sock", "explode"],
        ["ctl", "/tmp/n.sock", "start"],
        ["ctl", "/tmp/n.sock", "move", "blk0"],
        ["ctl", "/tmp/n.sock", "status", "--json=yes"],
        ["upgrade", "/tmp/n.sock"],
        ["upgrade", "/tmp/n.sock", "--to"],
        ["upgrade", "/tmp/n.sock", "--to", "k", "--timeout", "acquire"],
        ["upgrade", "/tmp/n.sock", "--to", "k", "--timeout", "acquire=soon"],
        ["upgrade", "--help"],
    ],
)
def test_unusual_ctl_goes_to_typer(argv):
    assert launcher.parse_ctl_args(argv) is None


def test_ctl_tables_mirror_the_typer_commands():
    command = typer.main.get_command(cli.app)
    ctl_group = command.commands["ctl"]  # type: ignore[attr-defined]

    def mirror(typer_command, positional, options):
        params = {p.name: p for p in typer_command.params}
        arguments = [p.name for p in typer_command.params if p.param_type_name == "argument"]
        assert tuple(arguments) == positional
        typer_options = {n for n, p in params.items() if p.param_type_name == "option"}
        assert typer_options == {name for name, _, _ in options.values()}
        for option, (name, kind, default) in options.items():
            assert params[name].opts == [option]
            assert params[name].is_flag == (kind is bool)
            assert params[name].multiple == (kind is list)
            if not params[name].required:
                assert params[name].default == default

    assert set(ctl_group.commands) == set(launcher.CTL_COMMANDS)
    for name, (positional, options) in launcher.CTL_COMMANDS.items():
        mirror(ctl_group.commands[name], positional, options)
    mirror(command.commands["upgrade"], ("control",), launcher.UPGRADE_OPTIONS)
