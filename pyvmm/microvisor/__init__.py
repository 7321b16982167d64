"""The microvisor: OS instances on one vCPU, virtualized only during maintenance.

Nothing here runs while the node is devirtualized: the vCPU then runs
``Machine.run``'s own loop, with direct interrupt delivery and the node's buses.
"""

from .instance import OsInstance
from .microvisor import Busy, Microvisor, MicrovisorError, RequestFailed

__all__ = ["Busy", "Microvisor", "MicrovisorError", "OsInstance", "RequestFailed"]
