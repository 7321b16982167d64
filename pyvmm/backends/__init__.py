"""Device back-ends in their own processes (the vhost-user model, DESIGN.md §4):
``vhost_user`` is the protocol both sides speak over a Unix socket.

Where a node's service devices run (``--device-backends``): in VMM threads or in
back-end processes. The default is ``DEFAULT_DEVICE_BACKENDS`` unless the environment
sets ``PYVMM_DEVICE_BACKENDS``; the command line (both parsers) and the Python API
(``node.add_service_devices``) take it from ``default_device_backends``. Kept here,
with no imports, so the lean launcher can read it.
"""

import os

DEVICE_BACKENDS = ("thread", "process")
DEFAULT_DEVICE_BACKENDS = "process"  # the one line to change (docs/decisions.md: why processes)
DEVICE_BACKENDS_ENV = "PYVMM_DEVICE_BACKENDS"


def default_device_backends() -> str:
    """``PYVMM_DEVICE_BACKENDS`` if set (checked where it is used), else the default."""
    return os.environ.get(DEVICE_BACKENDS_ENV) or DEFAULT_DEVICE_BACKENDS
