"""The modules' DOCUMENTATION, EXAMPLES and RETURN blocks parse as YAML, and the
documented options, as ansible-doc shows them (with the collection's doc fragment
merged in), are the argument_spec, option by option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ansible_collections.pyvmm.maintenance.plugins.modules import node_info, online_upgrade

MODULES = [online_upgrade, node_info]
ROOT = Path(__file__).resolve().parents[7]  # the directory holding ansible_collections/


@pytest.fixture(scope="module")
def ansible_doc() -> dict[str, dict]:
    """``ansible-doc --json`` of every module: its documentation as Ansible merges it."""
    names = [f"pyvmm.maintenance.{m.__name__.rsplit('.', 1)[-1]}" for m in MODULES]
    command = Path(sys.executable).parent / "ansible-doc"
    done = subprocess.run(
        [str(command) if command.exists() else "ansible-doc", "--json", *names],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    docs = json.loads(done.stdout)
    return {name.rsplit(".", 1)[-1]: entry["doc"] for name, entry in docs.items()}


def spec_of(module) -> dict:
    return module.ARGUMENT_SPEC


def check_options(documented: dict, spec: dict, where: str) -> None:
    assert set(documented) == set(spec), where
    for name, doc in documented.items():
        arg = spec[name]
        assert doc["description"], f"{where}.{name}: no description"
        assert doc["type"] == arg.get("type", "str"), f"{where}.{name}: type"
        assert doc.get("required", False) == arg.get("required", False), f"{where}.{name}"
        assert doc.get("default") == arg.get("default"), f"{where}.{name}: default"
        assert doc.get("choices") == arg.get("choices"), f"{where}.{name}: choices"
        if "options" in arg or "suboptions" in doc:
            check_options(doc["suboptions"], arg["options"], f"{where}.{name}")


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_doc_blocks_parse_and_match_the_argument_spec(module, ansible_doc):
    name = module.__name__.rsplit(".", 1)[-1]
    assert yaml.safe_load(module.DOCUMENTATION)["module"] == name
    doc = ansible_doc[name]
    assert doc["short_description"] and doc["description"] and doc["author"]
    assert doc["attributes"]["diff_mode"] and doc["requirements"]  # from the fragment
    check_options(doc["options"], spec_of(module), name)
    examples = yaml.safe_load(module.EXAMPLES)
    assert any(f"pyvmm.maintenance.{name}" in task for task in examples)
    for task in examples:
        if f"pyvmm.maintenance.{name}" in task:
            assert set(task[f"pyvmm.maintenance.{name}"]) <= set(spec_of(module))
    returned = yaml.safe_load(module.RETURN)
    for key, value in returned.items():
        assert value["description"] and value["returned"] and value["type"], key


def test_online_upgrade_documents_check_mode_support(ansible_doc):
    assert ansible_doc["online_upgrade"]["attributes"]["check_mode"]["support"] == "full"
