"""The control channel between the VMM and a back-end process: small JSON messages,
each a 4-byte little-endian length and that many bytes of UTF-8 JSON (an object),
with file descriptors (SCM_RIGHTS) on the length bytes, framed by the same code as
vhost-user (``vhost_user.send_frame``/``recv_head``).

A request is ``{"op": NAME, "id": N, ...}``, its reply ``{"id": N, "ok": true, ...}``
or ``{"id": N, "ok": false, "error": "..."}``. A body that is not a JSON object
keeps the stream in step (its length is known), so it is answered with an error;
only a length above ``MAX_MESSAGE`` ends the connection.
"""

from __future__ import annotations

import json
import struct
import time

from . import vhost_user as vu

LENGTH = struct.Struct("<I")
MAX_MESSAGE = 1 << 20
MAX_FDS = 8


class Malformed(ValueError):
    """A message in step but not a JSON object: answer it with an error."""


def send(sock, message: dict[str, object], fds: list[int] = ()) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    vu.send_frame(sock, LENGTH.pack(len(body)) + body, list(fds), f"{message.get('op', 'reply')}")


def receive(sock, timeout: float) -> tuple[dict[str, object], list[int]]:
    """One message and its fds. ``Malformed`` (the fds closed) for a body that is not
    a JSON object; ``vu.ProtocolError`` if the connection is unusable (closed, or a
    length above MAX_MESSAGE); ``vu.VhostUserTimeout`` if nothing came in time."""
    deadline = time.monotonic() + timeout
    head, fds = vu.recv_head(sock, LENGTH.size, deadline, MAX_FDS)
    try:
        (size,) = LENGTH.unpack(head)
        if size > MAX_MESSAGE:
            raise vu.ProtocolError(f"control message of {size} bytes (at most {MAX_MESSAGE})")
        body = vu.recv_exact(sock, size, deadline)
    except vu.VhostUserError:
        vu.close_all(fds)
        raise
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        vu.close_all(fds)
        raise Malformed(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        vu.close_all(fds)
        raise Malformed(f"not a JSON object: {type(message).__name__}")
    return message, fds
