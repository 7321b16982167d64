# Copyright: pyvmm maintainers
# MIT License (see the repository's pyproject.toml)
"""Documentation the collection's modules share: ``extends_documentation_fragment:
pyvmm.maintenance.node`` (Ansible merges its options, attributes, requirements and
notes into the module's own)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  control_socket:
    description:
      - Path of the node's control socket (C(pyvmm boot --control PATH)).
    type: path
    required: true
requirements:
  - pyvmm installed in the node's Python
notes:
  - The module runs on the node and uses the control client of the pyvmm installed in
    the node's Python (C(ansible_python_interpreter)).
attributes:
  diff_mode:
    support: none
    description: No diff.
  platform:
    support: full
    platforms: posix
    description: A Linux host running a pyvmm node.
"""
