#!/usr/bin/python
# Copyright: pyvmm maintainers
# MIT License (see the repository's pyproject.toml)
"""Ansible module: upgrade a pyvmm node's running OS online."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: online_upgrade
short_description: Upgrade a pyvmm node's running OS online, without downtime
version_added: "0.1.0"
description:
  - Runs pyvmm's single-node online upgrade through the node's control socket. The new
    kernel boots in the node's spare memory partition next to the running one, the
    service (its disk and forwarded ports) moves over, and the old instance retires.
  - Before anything else it asks the node for a C(preflight). If the serving instance
    already runs O(kernel) (compared by the file's SHA-256) with O(cmdline), the task
    changes nothing and returns C(changed=false).
  - In check mode only the preflight runs. The task reports C(changed) as the upgrade
    would, and fails if the upgrade could not start (the kernel does not parse or does
    not fit, the node is not devirtualized and idle).
  - An upgrade that rolls back (the node serves on with its old instance) is a task
    failure carrying the upgrade report, so C(max_fail_percentage) and
    C(any_errors_fatal) act on it.
options:
  kernel:
    description:
      - Absolute path, on the node, of the PVH kernel image to upgrade to.
      - Copy it there first (for example with M(ansible.builtin.copy)), or give O(src).
    type: path
    required: true
  src:
    description:
      - A kernel image on the controller to copy to O(kernel) on the node first
        (as M(ansible.builtin.copy) would, mode 0644; searched like its O(src)).
      - In check mode the node's O(kernel) is left alone and the preflight reads a copy
        staged in the task's temporary directory.
    type: path
  cmdline:
    description:
      - Extra command-line words for the new kernel. The node adds its own (console,
        role, instance name); these are the ones compared for idempotence.
    type: str
    default: ""
  timeouts:
    description:
      - Per-phase time-outs in seconds. A phase that runs out rolls the upgrade back.
      - Phases left out keep the node's defaults.
    type: dict
    suboptions:
      boot:
        description: Booting the new instance.
        type: float
      ready:
        description: Until the new instance reports ready.
        type: float
      release:
        description: Until the old instance has released the service.
        type: float
      acquire:
        description: Until the new instance serves (the commit point).
        type: float
  inject:
    description:
      - A fault to inject, for tests and demonstrations of the rollback.
    type: str
    choices: [boot-fails, crash-after-ready, never-serving, release-refused, phase-timeout]
attributes:
  action:
    support: full
    description: An action plugin copies O(src) to the node first.
  check_mode:
    support: full
    description: Runs the node's preflight only.
extends_documentation_fragment:
  - pyvmm.maintenance.node
author:
  - pyvmm maintainers (@pyvmm)
"""

EXAMPLES = r"""
- name: Put the new kernel on the node
  ansible.builtin.copy:
    src: build/webkv-v2.elf
    dest: /var/lib/pyvmm/webkv-v2.elf
    mode: "0644"

- name: Upgrade the node online
  pyvmm.maintenance.online_upgrade:
    control_socket: /run/pyvmm/node.sock
    kernel: /var/lib/pyvmm/webkv-v2.elf
    timeouts:
      acquire: 30
  register: upgrade

- name: Copy the kernel from the controller and upgrade, in one task
  pyvmm.maintenance.online_upgrade:
    control_socket: /run/pyvmm/node.sock
    src: build/webkv-v2.elf
    kernel: /var/lib/pyvmm/webkv-v2.elf

- name: Show how long the service moved for
  ansible.builtin.debug:
    msg: "{{ upgrade.report.before }} -> {{ upgrade.report.after }}: {{ upgrade.report.total_s }} s"
"""

RETURN = r"""
changed:
  description: Whether the node now runs another kernel (in check mode, whether it would).
  returned: always
  type: bool
kernel_sha256:
  description: SHA-256 of O(kernel), as the node read it.
  returned: when the node could read the kernel
  type: str
  sample: 3f0c...e1
preflight:
  description:
    - The node's preflight answer. C(ready) and C(problems) say whether an upgrade could
      start; C(up_to_date) whether the serving instance already runs this kernel and
      command line.
  returned: always
  type: dict
  sample:
    ready: true
    problems: []
    up_to_date: false
    serving: a
    spare_partition: 1
report:
  description:
    - The upgrade report, as the node's C(upgrade) operation returns it.
    - C(ok), C(before) and C(after) (the service versions), C(phases) (each with its
      start relative to C(monotonic_start) and its duration), C(total_s),
      C(monotonic_start) (the node's CLOCK_MONOTONIC); after a rollback also
      C(rolled_back), C(failed_phase) and C(reason).
  returned: when an upgrade ran
  type: dict
  sample:
    ok: true
    before: v1
    after: v2
    instance: b
    total_s: 0.21
kernel_copied:
  description: Whether O(src) was copied over a different O(kernel) (false in check mode).
  returned: when src was given
  type: bool
rolled_back:
  description: The upgrade failed before its commit point and the old instance serves on.
  returned: when an upgrade ran
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pyvmm.maintenance.plugins.module_utils.node import call

FAULTS = ["boot-fails", "crash-after-ready", "never-serving", "release-refused", "phase-timeout"]
PHASE_TIMEOUTS = ("boot", "ready", "release", "acquire")

ARGUMENT_SPEC = dict(
    control_socket=dict(type="path", required=True),
    kernel=dict(type="path", required=True),
    src=dict(type="path"),
    cmdline=dict(type="str", default=""),
    timeouts=dict(
        type="dict",
        options={phase: dict(type="float") for phase in PHASE_TIMEOUTS},
    ),
    inject=dict(type="str", choices=FAULTS),
)


def run(module):
    params = module.params
    if params["src"] is not None:
        # The action plugin takes src off before the module runs on the node.
        module.fail_json(msg="src is copied by the controller: run this module through Ansible")
    kernel = params["kernel"]
    if not kernel.startswith("/"):
        module.fail_json(msg=f"kernel must be an absolute path on the node, not {kernel!r}")
    timeouts = {k: v for k, v in (params["timeouts"] or {}).items() if v is not None}
    bad = [k for k, v in timeouts.items() if v <= 0]
    if bad:
        module.fail_json(msg=f"timeouts must be positive seconds: {', '.join(sorted(bad))}")

    preflight = call(module, "preflight", kernel=kernel, cmdline=params["cmdline"])
    result = dict(changed=False, preflight=preflight, kernel_sha256=preflight["kernel_sha256"])
    if preflight["up_to_date"]:
        module.exit_json(msg="the node already runs this kernel and command line", **result)
    if not preflight["ready"]:
        module.fail_json(msg="preflight: " + "; ".join(preflight["problems"]), **result)
    if module.check_mode:
        result["changed"] = True
        module.exit_json(msg="the node would be upgraded (the preflight passed)", **result)

    arguments = dict(kernel=kernel, cmdline=params["cmdline"])
    if timeouts:
        arguments["timeouts"] = timeouts
    if params["inject"]:
        arguments["inject"] = params["inject"]
    report = call(module, "upgrade", **arguments)
    result.update(report=report, rolled_back=not report["ok"])
    if not report["ok"]:
        # The node is back on its old instance: nothing changed, and the task failed.
        module.fail_json(
            msg=f"rolled back in {report.get('failed_phase')}: {report.get('reason')}; "
            f"{report.get('before')} serves on",
            **result,
        )
    result["changed"] = True
    module.exit_json(
        msg=f"upgraded {report.get('before')} -> {report.get('after')} in "
        f"{report['total_s'] * 1000:.0f} ms",
        **result,
    )


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    run(module)


if __name__ == "__main__":
    main()
