#!/usr/bin/python
# Copyright: pyvmm maintainers
# MIT License (see the repository's pyproject.toml)
"""Ansible module: a pyvmm node's status, read-only."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: node_info
short_description: Read a pyvmm node's status
version_added: "0.1.0"
description:
  - Asks the node's control socket for its C(status) and returns it. Changes nothing.
  - The status holds the microvisor's mode, every instance (partition, devices, the
    kernel's SHA-256 and its command line), switch and exit counters; the repository's
    docs/status.md describes each field.
attributes:
  check_mode:
    support: full
    description: Reads only, in check mode as otherwise.
extends_documentation_fragment:
  - pyvmm.maintenance.node
author:
  - pyvmm maintainers (@pyvmm)
"""

EXAMPLES = r"""
- name: Read the node's status
  pyvmm.maintenance.node_info:
    control_socket: /run/pyvmm/node.sock
  register: node

- name: Show the kernel the node serves with
  ansible.builtin.debug:
    msg: "{{ node.serving.kernel_sha256 }}"
"""

RETURN = r"""
status:
  description: The node's C(status), as C(pyvmm ctl PATH status --json) shows it.
  returned: always
  type: dict
  sample:
    mode: devirtualized
    current: b
    instances: []
    switches: 212
serving:
  description:
    - The one running instance (name, partition, kernel, kernel_sha256, cmdline,
      service_cmdline, devices), or null while two run (maintenance under way).
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pyvmm.maintenance.plugins.module_utils.node import call

ARGUMENT_SPEC = dict(control_socket=dict(type="path", required=True))


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    status = call(module, "status")
    running = [i for i in status["instances"] if i["status"] == "running"]
    serving = running[0] if len(running) == 1 else None
    module.exit_json(changed=False, status=status, serving=serving)


if __name__ == "__main__":
    main()
