"""The lean ``boot`` parser must agree with the typer CLI it stands in for."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from pyvmm import cli, launcher


def typer_boot_arguments(monkeypatch, argv: list[str]) -> dict[str, object] | None:
    seen: dict[str, object] = {}

    def fake_run_boot(kernel, mem, cmdline, timeout, control, disk=None, forward=None):
        seen.update(kernel=kernel, mem=mem, cmdline=cmdline, timeout=timeout, control=control)
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
        ["boot", "k.elf", "--disk", "d.img"],
        ["boot", "k.elf", "--forward", "8080=80"],
    ],
)
def test_anything_unusual_goes_to_typer(argv):
    assert launcher.parse_boot_args(argv) is None


def test_options_mirror_the_typer_command():
    command = typer.main.get_command(cli.app)
    boot = command.commands["boot"]  # type: ignore[attr-defined]
    params = {p.name: p for p in boot.params if p.param_type_name == "option"}
    # Options for service devices always take the typer path (parse_boot_args refuses them).
    typer_only = {"disk", "forward"}
    assert set(params) == {name for name, _, _ in launcher.BOOT_OPTIONS.values()} | typer_only
    for option, (name, _, default) in launcher.BOOT_OPTIONS.items():
        assert option in params[name].opts
        assert params[name].default == default


def test_parse_size():
    assert launcher.parse_size("256M") == 256 << 20
    assert launcher.parse_size("1G") == 1 << 30
    assert launcher.parse_size("512MiB") == 512 << 20
    assert launcher.parse_size("64") == 64 << 20
    with pytest.raises(ValueError, match="not a size"):
        launcher.parse_size("lots")
