# Copyright: pyvmm maintainers
# MIT License (see the repository's pyproject.toml)
"""Ansible filter: the fleet report from each node's online_upgrade result."""

from __future__ import annotations

DOCUMENTATION = r"""
---
name: fleet_report
short_description: Sum up online_upgrade results into one fleet report
version_added: "0.1.0"
description:
  - Takes a dict of host name to the registered result of
    M(pyvmm.maintenance.online_upgrade) and returns one report for the fleet.
  - Each node gets an outcome (C(upgraded), C(unchanged), C(would_upgrade) in check
    mode, C(rolled_back), C(failed) or C(not_run)) and the figures of its upgrade
    report; the fleet gets counts and the upgrade span, from the first node's upgrade
    start to the last node's end on the nodes' CLOCK_MONOTONIC (one clock when the nodes
    share a host; across hosts only the per-node times compare).
options:
  _input:
    description: Host name to registered online_upgrade result (an empty dict if it did not run).
    type: dict
    required: true
author:
  - pyvmm maintainers (@pyvmm)
"""

EXAMPLES = r"""
- name: Sum up the fleet
  ansible.builtin.debug:
    msg: "{{ dict(ansible_play_hosts_all | zip(results)) | pyvmm.maintenance.fleet_report }}"
"""

RETURN = r"""
_value:
  description: C(nodes) (host to its figures), C(fleet) (counts, span_s) and C(lines), one
    human line per node and one for the fleet.
  type: dict
"""

OUTCOMES = ("upgraded", "unchanged", "would_upgrade", "rolled_back", "failed", "not_run")


def node_summary(result):
    """One node's outcome and figures from its registered online_upgrade result."""
    report = result.get("report") or {}
    if not result:
        outcome = "not_run"
    elif result.get("rolled_back"):
        outcome = "rolled_back"
    elif result.get("failed"):
        outcome = "failed"
    elif report.get("ok"):
        outcome = "upgraded"
    elif result.get("changed"):
        outcome = "would_upgrade"
    else:
        outcome = "unchanged"
    node = {"outcome": outcome, "msg": result.get("msg"), "kernel_sha256": None}
    node["kernel_sha256"] = result.get("kernel_sha256")
    if report:
        start = report["monotonic_start"]
        node.update(
            before=report.get("before"),
            after=report.get("after"),
            total_s=report["total_s"],
            monotonic_start=start,
            monotonic_end=start + report["total_s"],
            failed_phase=report.get("failed_phase"),
            reason=report.get("reason"),
            phases={p["phase"]: p["seconds"] for p in report.get("phases", [])},
        )
    return node


def node_line(host, node):
    outcome = node["outcome"]
    if outcome == "upgraded":
        what = f"upgraded {node['before']} -> {node['after']} in {node['total_s'] * 1000:.0f} ms"
    elif outcome == "rolled_back":
        what = (
            f"ROLLED BACK in {node['failed_phase']} ({node['reason']}); {node['before']} "
            f"serves on, {node['total_s'] * 1000:.0f} ms"
        )
    elif outcome == "unchanged":
        what = "unchanged: already runs this kernel and command line"
    elif outcome == "would_upgrade":
        what = "would be upgraded (check mode: preflight passed)"
    elif outcome == "failed":
        what = f"FAILED: {node['msg']}"
    else:
        what = "not run (the play stopped before this node)"
    return f"{host}: {what}"


def fleet_report(results):
    nodes = {host: node_summary(result or {}) for host, result in sorted(results.items())}
    counts = {outcome: 0 for outcome in OUTCOMES}
    for node in nodes.values():
        counts[node["outcome"]] += 1
    timed = [n for n in nodes.values() if "monotonic_start" in n]
    span = None
    if timed:
        span = max(n["monotonic_end"] for n in timed) - min(n["monotonic_start"] for n in timed)
    fleet = {"nodes": len(nodes), **counts, "span_s": None if span is None else round(span, 4)}
    line = ", ".join(
        f"{count} {outcome.replace('_', ' ')}" for outcome, count in counts.items() if count
    )
    if span is not None:
        line += f"; upgrade span {span * 1000:.0f} ms"
    lines = [node_line(host, node) for host, node in nodes.items()]
    lines.append(f"fleet: {len(nodes)} nodes: {line or 'none'}")
    return {"nodes": nodes, "fleet": fleet, "lines": lines}


class FilterModule:
    def filters(self):
        return {"fleet_report": fleet_report}
