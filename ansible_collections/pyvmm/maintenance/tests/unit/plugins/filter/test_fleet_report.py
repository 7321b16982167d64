"""The fleet report filter: outcomes per node, counts and the upgrade span."""

from __future__ import annotations

import yaml

from ansible_collections.pyvmm.maintenance.plugins.filter import fleet_report as plugin


def report(start: float, total: float, ok: bool = True) -> dict:
    base = {"before": "v1", "after": "v2" if ok else "v1", "total_s": total}
    base.update(monotonic_start=start, ok=ok, phases=[{"phase": "boot", "seconds": 0.01}])
    if not ok:
        base.update(rolled_back=True, failed_phase="release", reason="refused")
    return base


def test_outcomes_counts_and_span():
    results = {
        "node1": {"changed": True, "report": report(10.0, 0.2), "kernel_sha256": "ab"},
        "node2": {"changed": True, "report": report(10.5, 0.3)},
        "node3": {
            "changed": False,
            "failed": True,
            "rolled_back": True,
            "report": report(10.4, 0.1, ok=False),
            "msg": "rolled back",
        },
        "node4": {"changed": False, "msg": "the node already runs this kernel"},
        "node5": {"changed": True, "preflight": {"ready": True}},  # check mode
        "node6": {"failed": True, "msg": "preflight: cannot reach the node"},
        "node7": {},
    }
    fleet = plugin.FilterModule().filters()["fleet_report"](results)
    outcomes = {host: node["outcome"] for host, node in fleet["nodes"].items()}
    assert outcomes == {
        "node1": "upgraded",
        "node2": "upgraded",
        "node3": "rolled_back",
        "node4": "unchanged",
        "node5": "would_upgrade",
        "node6": "failed",
        "node7": "not_run",
    }
    assert fleet["fleet"]["upgraded"] == 2 and fleet["fleet"]["rolled_back"] == 1
    assert fleet["fleet"]["span_s"] == 0.8  # 10.0 .. 10.8
    assert fleet["nodes"]["node1"]["phases"] == {"boot": 0.01}
    assert fleet["lines"][0] == "node1: upgraded v1 -> v2 in 200 ms"
    assert fleet["lines"][2].startswith("node3: ROLLED BACK in release (refused); v1 serves on")
    assert fleet["lines"][-1] == (
        "fleet: 7 nodes: 2 upgraded, 1 unchanged, 1 would upgrade, 1 rolled back, 1 failed, "
        "1 not run; upgrade span 800 ms"
    )


def test_nothing_ran():
    fleet = plugin.fleet_report({})
    assert fleet["fleet"]["span_s"] is None and fleet["lines"] == ["fleet: 0 nodes: none"]


def test_doc_blocks_parse():
    doc = yaml.safe_load(plugin.DOCUMENTATION)
    assert doc["name"] == "fleet_report"
    assert yaml.safe_load(plugin.EXAMPLES) and yaml.safe_load(plugin.RETURN)["_value"]
