"""The control socket of a running node: the server side of the protocol that
``pyvmm.control_client`` defines (newline-delimited JSON over a Unix socket). A
request that is malformed or makes no sense in the current state gets an error reply
and changes nothing. The socket is created with mode 0600.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from .control_client import MAX_REQUEST, encode
from .errors import PyvmmError, UsageError
from .microvisor import Busy, Microvisor, MicrovisorError, RequestFailed
from .microvisor.health import node_status

# Error codes of a reply {"ok": false, "code": ..., "error": "<sentence>"}:
BUSY = "busy"  # another mutating operation is running; retry later, nothing changed
INVALID = "invalid"  # malformed, or makes no sense in the node's state; nothing changed
FAILED = "failed"  # tried and failed (an upgrade that rolls back is ok: true instead)


class RequestError(Exception):
    """The request itself is malformed."""


def _text(request: dict[str, Any], key: str, default: str | None = None) -> str:
    value = request.get(key, default)
    if not isinstance(value, str) or not value:
        raise RequestError(f"{key!r} must be a non-empty string")
    return value


def _operations(
    mv: Microvisor, services: Any = None, progress: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Callable[[dict[str, Any]], object]]:
    def start(r: dict[str, Any]) -> object:
        devices = r.get("devices", [])
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise RequestError("'devices' must be a list of device names")
        name = r.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise RequestError("'name' must be a non-empty string")
        cmdline = r.get("cmdline", "")
        if not isinstance(cmdline, str):
            raise RequestError("'cmdline' must be a string")
        instance = mv.start(_text(r, "kernel"), cmdline, name, tuple(devices))
        return instance.describe()

    def upgrade(r: dict[str, Any]) -> object:
        from .microvisor.maintenance import Upgrade

        if services is None:
            raise RequestError("this node has no service devices to hand over")
        inject = r.get("inject")
        if inject is not None and not isinstance(inject, str):
            raise RequestError("'inject' must be a string")
        force = r.get("force", False)
        if not isinstance(force, bool):
            raise RequestError("'force' must be true or false")

        def report(phase: str, state: str, seconds: float) -> None:
            if progress is not None:
                progress({"phase": phase, "state": state, "seconds": round(seconds, 4)})

        cmdline = r.get("cmdline", "")
        if not isinstance(cmdline, str):
            raise RequestError("'cmdline' must be a string")
        timeouts = r.get("timeouts", {})
        if not isinstance(timeouts, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and v > 0 for k, v in timeouts.items()
        ):
            raise RequestError("'timeouts' must map phase names to positive seconds")
        return Upgrade(
            mv,
            services,
            _text(r, "kernel"),
            cmdline,
            timeouts=timeouts,
            inject=inject,
            force=force,
            progress=report,
        ).run()

    def preflight(r: dict[str, Any]) -> object:
        from .microvisor.preflight import preflight

        cmdline = r.get("cmdline", "")
        if not isinstance(cmdline, str):
            raise RequestError("'cmdline' must be a string")
        return preflight(mv, services, _text(r, "kernel"), cmdline)

    return {
        "upgrade": upgrade,
        "preflight": preflight,
        "status": lambda r: node_status(mv, services),
        "virtualize": lambda r: mv.virtualize(),
        "devirtualize": lambda r: mv.devirtualize(),
        "start": start,
        "stop": lambda r: mv.stop(_text(r, "name")),
        "move": lambda r: mv.move(_text(r, "device"), _text(r, "to")),
        "pause": lambda r: mv.pause(_text(r, "name")),
        "resume": lambda r: mv.resume(_text(r, "name")),
    }


def handle(
    mv: Microvisor,
    line: bytes,
    services: Any = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One request line → one reply object. Never raises. Long requests (upgrade) may
    report progress objects through ``progress`` before the reply."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise RequestError("a request is a JSON object")
        op = request.get("op")
        operations = _operations(mv, services, progress)
        if op not in operations:
            raise RequestError(f"unknown op {op!r}; one of {', '.join(sorted(operations))}")
        return {"ok": True, "result": operations[op](request)}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(INVALID, "malformed request: not a JSON line")
    except Busy as exc:
        return _error(BUSY, str(exc))
    except (RequestError, UsageError) as exc:
        return _error(INVALID, str(exc))
    except RequestFailed as exc:
        return _error(FAILED, str(exc))
    except MicrovisorError as exc:
        return _error(INVALID, str(exc))  # makes no sense now: nothing was changed
    except PyvmmError as exc:
        return _error(FAILED, str(exc))
    except OSError as exc:
        return _error(FAILED, f"host error: {exc}")
    except Exception as exc:  # a bug: the reply says so, the node and the socket go on
        return _error(FAILED, f"internal error: {type(exc).__name__}: {exc}")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code, "error": message}


class ControlServer:
    def __init__(self, path: str, microvisor: Microvisor, services: Any = None) -> None:
        self.path = path
        self.microvisor = microvisor
        self.services = services
        _remove_stale_socket(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            self._sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._sock.listen(8)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        if self.services is not None:
            # Import now what an upgrade needs: ~10 ms of GIL-holding imports would
            # otherwise stall the running service at the first upgrade's start.
            from .microvisor import maintenance  # noqa: F401
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="control-client", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while True:
                line = reader.readline(MAX_REQUEST + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST:
                    reply = _error(INVALID, f"request longer than {MAX_REQUEST} bytes")
                    conn.sendall(encode(reply))
                    return

                def progress(update: dict[str, Any]) -> None:
                    try:
                        conn.sendall(encode({"progress": update}))
                    except OSError:
                        pass  # the client went away: the upgrade itself goes on

                reply = handle(self.microvisor, line, self.services, progress)
                try:
                    conn.sendall(encode(reply))
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise PyvmmError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: a leftover from a node that is gone
        return
    finally:
        probe.close()
    raise PyvmmError(f"{path} is in use by another running node")
