# Copyright: pyvmm maintainers
# MIT License (see the repository's pyproject.toml)
"""The controller side of online_upgrade: with ``src``, the kernel goes to the node
first (as ansible.builtin.copy would put it at ``kernel``), then the module runs there.

In check mode the node's ``kernel`` file is left alone: the kernel is staged in the
task's temporary directory on the node, the preflight reads that copy, and the
directory is removed afterwards.
"""

from __future__ import annotations

import os

from ansible.errors import AnsibleError
from ansible.plugins.action import ActionBase

MODULE = "pyvmm.maintenance.online_upgrade"


class ActionModule(ActionBase):
    TRANSFERS_FILES = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        args = dict(self._task.args)
        src = args.pop("src", None)
        if src is None:
            result.update(self._execute_module(MODULE, module_args=args, task_vars=task_vars))
            return result
        if not args.get("kernel"):
            result.update(failed=True, msg="src needs kernel: where to put it on the node")
            return result
        try:
            local = self._find_needle("files", src)
        except AnsibleError as exc:
            result.update(failed=True, msg=str(exc))
            return result
        shell = self._connection._shell
        try:
            staged = shell.join_path(shell.tmpdir, "kernel" + os.path.splitext(local)[1])
            self._transfer_file(local, staged)
            self._fixup_perms2((shell.tmpdir, staged))
            if self._task.check_mode:
                args["kernel"] = staged
                result["kernel_copied"] = False
            else:
                copy_args = dict(
                    src=staged,
                    dest=args["kernel"],
                    mode="0644",
                    _original_basename=os.path.basename(local),
                )
                copied = self._execute_module(
                    "ansible.legacy.copy", module_args=copy_args, task_vars=task_vars
                )
                if copied.get("failed"):
                    result.update(failed=True, msg=f"copying {src}: {copied.get('msg')}")
                    return result
                result["kernel_copied"] = bool(copied.get("changed"))
            result.update(self._execute_module(MODULE, module_args=args, task_vars=task_vars))
            return result
        finally:
            self._remove_tmp_path(shell.tmpdir)
