# Copyright: pyvmm maintainers
# MIT License (see the repository's pyproject.toml)
"""What both modules share: pyvmm's own control client, imported from the pyvmm that
is installed on the node's Python, and one way to turn its errors into task failures."""

from __future__ import annotations

import traceback

from ansible.module_utils.basic import missing_required_lib

try:
    from pyvmm import control_client
    from pyvmm.errors import PyvmmError
except ImportError:
    control_client = None
    PyvmmError = Exception
    PYVMM_IMPORT_ERROR = traceback.format_exc()
else:
    PYVMM_IMPORT_ERROR = None


def require_pyvmm(module):
    """Fail the task, saying what is missing, when the node's Python has no pyvmm."""
    if control_client is None:
        module.fail_json(
            msg=missing_required_lib(
                "pyvmm", reason="to talk to the node's control socket (pip install pyvmm)"
            ),
            exception=PYVMM_IMPORT_ERROR,
        )


def call(module, op, **arguments):
    """One control request to the node; its result, or a task failure with the node's
    own message (an unreachable socket, an error reply)."""
    require_pyvmm(module)
    path = module.params["control_socket"]
    timeout = control_client.reply_timeout(arguments.get("timeouts"))
    try:
        return control_client.call(path, op, timeout=timeout, **arguments)
    except PyvmmError as exc:
        module.fail_json(msg=f"{op}: {exc}", control_socket=path)
