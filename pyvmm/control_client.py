"""The client side of the control protocol, and its framing: the one place for both.

A node's control socket speaks newline-delimited JSON over a Unix socket. A request is
one object ``{"op": "<name>", ...arguments}``; the reply is one line, ``{"ok": true,
"result": ...}`` or ``{"ok": false, "code": "...", "error": "..."}``, where ``code`` is
``busy`` (another mutating operation runs: start, stop, move, virtualize,
devirtualize, pause, resume and upgrade go one at a time; retry later), ``invalid``
(malformed, or makes no sense in the node's state) or ``failed`` (tried and failed);
in each case nothing was changed. Long operations (upgrade) may send
``{"progress": {...}}`` lines before it.

This module imports only the standard library and ``pyvmm.errors``: the CLI's fast
path, the server (``pyvmm.control``) and the Ansible modules, which run on a node's
Python and must not drag in KVM or the microvisor, all use it.
"""

from __future__ import annotations

import json
import socket

from .errors import PyvmmError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

MAX_REQUEST = 64 * 1024
# Per read: an upgrade sends a progress line at each phase, so this bounds one phase.
DEFAULT_TIMEOUT_S = 120.0


class ControlError(PyvmmError):
    """The node cannot be reached, or it broke the protocol."""


class OperationFailed(PyvmmError):
    """The node answered the request with an error reply."""


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line."""
    return json.dumps(message).encode() + b"\n"


def request(
    path: str,
    op: str,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    **arguments: object,
) -> dict[str, Any]:
    """Send one request to a node's control socket and return its reply object (which
    may be an error reply); progress lines that come first go to ``on_progress``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise ControlError(f"cannot reach the node at {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(encode({"op": op, **arguments}))
            with sock.makefile("rb") as reader:
                while True:
                    line = reader.readline()
                    if not line:
                        raise ControlError(f"the node at {path} closed the connection")
                    message = _decode(line, path)
                    if "progress" in message and "ok" not in message:
                        if on_progress is not None:
                            on_progress(message["progress"])
                        continue
                    return message
        except TimeoutError:
            raise ControlError(f"the node at {path} did not answer within {timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"talking to the node at {path}: {exc.strerror or exc}") from None


def reply_timeout(phase_timeouts: dict[str, float] | None) -> float:
    """How long a client waits for the next line of an upgrade with these phase
    time-outs: longer than any phase may take, so the node always answers first."""
    return DEFAULT_TIMEOUT_S + sum((phase_timeouts or {}).values())


def call(path: str, op: str, timeout: float = DEFAULT_TIMEOUT_S, **arguments: object) -> Any:
    """``request`` for callers that want the result: an error reply raises
    ``OperationFailed`` with the node's message."""
    reply = request(path, op, timeout=timeout, **arguments)
    if not reply.get("ok"):
        raise OperationFailed(str(reply.get("error", "the node refused the request")))
    return reply.get("result")


def _decode(line: bytes, path: str) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ControlError(f"the node at {path} sent a line that is not JSON") from None
    if not isinstance(message, dict):
        raise ControlError(f"the node at {path} sent {type(message).__name__}, not an object")
    return message
