"""``pyvmm ctl`` and ``pyvmm upgrade``, without typer.

A fleet tool calls these once per node and per step, so their start-up counts
(≤100 ms, as ``pyvmm boot``'s): ``launcher`` parses plain invocations itself and calls
``run_ctl``/``run_upgrade`` here; ``cli.py``'s typer commands call the same functions.
Each returns the process exit status; errors are one line on stderr.
"""

from __future__ import annotations

import json
import sys

from .control_client import reply_timeout, request
from .errors import PyvmmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

EX_ROLLED_BACK = 3  # `pyvmm upgrade`: the node is back on its old instance


def parse_timeouts(items: list[str] | None) -> dict[str, float]:
    """``["acquire=2", ...]`` → ``{"acquire": 2.0}``; ValueError names a bad item."""
    timeouts: dict[str, float] = {}
    for item in items or ():
        phase, eq, seconds = item.partition("=")
        try:
            if not eq or not phase:
                raise ValueError
            timeouts[phase] = float(seconds)
        except ValueError:
            raise ValueError(f"--timeout {item!r}: expected PHASE=SECONDS") from None
    return timeouts


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _send(
    path: str, op: str, as_json: bool, on_progress: Any = None, **arguments: Any
) -> dict[str, Any] | None:
    """One control request; None (after one error line on stderr) if it failed."""
    timeout = reply_timeout(arguments.get("timeouts"))
    try:
        reply = request(path, op, on_progress=on_progress, timeout=timeout, **arguments)
    except PyvmmError as exc:
        _err(f"pyvmm: error: {exc}")
        return None
    if as_json:
        _out(json.dumps(reply))
    if not reply.get("ok"):
        if not as_json:
            _err(f"pyvmm: error: {reply.get('error')}")
        return None
    return reply


def _show_status(s: dict[str, Any]) -> list[str]:
    lines = [f"mode: {s['mode']}  current: {s['current']}"]
    for i in s["instances"]:
        lines.append(
            f"  {i['name']}: {i['status']}, partition {i['partition']} "
            f"[{i['base']:#x}+{i['size'] >> 20} MiB], devices {', '.join(i['devices']) or '-'}"
        )
        if i.get("kernel_sha256"):
            lines.append(f"    kernel sha256 {i['kernel_sha256'][:16]}…  cmdline {i['cmdline']!r}")
    lat = s["switch_latency_us"]
    lines.append(
        f"switches: {s['switches']}  exits: {s['exits']}  switch latency us: "
        f"p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} max {lat['max']}"
    )
    last = s.get("last_upgrade")
    if last:
        why = f" in {last['phase']}: {last['reason']}" if last.get("reason") else ""
        lines.append(f"last upgrade: {last['outcome']}{why}")
    if s.get("virtualized_reason"):
        lines.append(f"virtualized because: {s['virtualized_reason']}")
    lines += [f"invariant broken: {problem}" for problem in s.get("invariant", [])]
    return lines


def _show_preflight(p: dict[str, Any]) -> list[str]:
    if p["ready"]:
        head = "ready: the upgrade can start"
    else:
        head = "not ready: " + "; ".join(p["problems"])
    if p.get("up_to_date"):
        head += " (the serving instance already runs this kernel and command line)"
    return [head]


# command → (what it prints on success, given the request's arguments and the result)
CTL_OUTPUT = {
    "status": lambda a, r: _show_status(r),
    "preflight": lambda a, r: _show_preflight(r),
    "virtualize": lambda a, r: ["virtualized"],
    "devirtualize": lambda a, r: ["devirtualized"],
    "start": lambda a, r: [f"started {r['name']} in partition {r['partition']}"],
    "stop": lambda a, r: [f"stopped {a['name']}"],
    "pause": lambda a, r: [f"paused {a['name']}"],
    "resume": lambda a, r: [f"resumed {a['name']}"],
    "move": lambda a, r: [f"moved {a['device']} to {a['to']}"],
}


def run_ctl(path: str, command: str, as_json: bool = False, **arguments: Any) -> int:
    """``pyvmm ctl PATH COMMAND``: one request, its result in words (or the JSON reply)."""
    reply = _send(path, command, as_json, **arguments)
    if reply is None:
        return 1
    if not as_json:
        for line in CTL_OUTPUT[command](arguments, reply["result"]):
            _out(line)
    if command == "preflight" and not reply["result"]["ready"]:
        return 1
    return 0


def run_upgrade(
    control: str,
    to: str,
    cmdline: str = "",
    inject: str | None = None,
    timeouts: dict[str, float] | None = None,
    as_json: bool = False,
    force: bool = False,
) -> int:
    """``pyvmm upgrade``: 0 upgraded (also rolled forward: the new version serves, the
    report says what is left), 3 rolled back, 1 the request failed or the node is not
    in a known state (the report's ``invariant`` says what is wrong)."""
    import os
    import time

    # This process only watches: at the hand-off its printing and exit must not take
    # a core from the service (on a two-core node that shows as client stalls).
    os.nice(10)
    started = time.monotonic()

    def show(update: dict[str, Any]) -> None:
        if not as_json and update["state"] != "start":
            elapsed = time.monotonic() - started
            _err(
                f"[{elapsed:7.3f}s] {update['phase']:<13} {update['state']:<6} "
                f"{update['seconds'] * 1000:9.1f} ms"
            )

    arguments: dict[str, Any] = {"kernel": to, "cmdline": cmdline}
    if inject:
        arguments["inject"] = inject
    if timeouts:
        arguments["timeouts"] = timeouts
    if force:
        arguments["force"] = True
    reply = _send(control, "upgrade", as_json, on_progress=show, **arguments)
    if reply is None:
        return 1
    report = reply["result"]
    if not as_json:
        phases = ", ".join(f"{p['phase']} {p['seconds'] * 1000:.1f} ms" for p in report["phases"])
        if report["ok"]:
            _out(
                f"upgraded {report['before']} -> {report['after']} in "
                f"{report['total_s'] * 1000:.0f} ms ({phases})"
            )
            if report.get("outcome") == "rolled_forward":
                _out(f"left to do: {report['failed_phase']}: {report['reason']}")
        else:
            _out(
                f"rolled back: {report['failed_phase']}: {report['reason']}; still "
                f"{report['before']} ({phases})"
            )
        for problem in report.get("invariant", []):
            _err(f"pyvmm: error: the node is not in a known state: {problem}")
    if report.get("outcome") == "failed":
        return 1
    return 0 if report["ok"] else EX_ROLLED_BACK
