"""ioctl/ against <linux/kvm.h>: sizes, field offsets, constants and ioctl encoding.

A generated C program prints what the compiler knows about the header, one fact a line:
``sizeof <struct> <n>``, ``offsetof <struct> <field.path> <n>``,
``fieldsize <struct> <field.path> <n>`` and ``value <MACRO> <n>``. Every fact is derived
from the Python definitions, so a new structure, field or constant is covered without
touching this file. Needs gcc and linux-libc-dev, not /dev/kvm.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from ioctl import encoding, numbers, structs

KVM_H = Path("/usr/include/linux/kvm.h")

Facts = dict[tuple[str, ...], int]
CType = type[ctypes.Structure] | type[ctypes.Union]

# Python names for structs that are anonymous in C; they are checked as kvm_run members.
PYTHON_ONLY = {name for name in vars(structs) if name.startswith("kvm_run_")}

# Where the C spelling of a field path differs from Python's. A key renames that path
# and everything below it. Members of anonymous C unions need no entry: offsetof()
# reaches them by their own name (kvm_irq_level.irq, kvm_dirty_log.dirty_bitmap).
C_SPELLING: dict[str, dict[str, str]] = {
    "kvm_run": {
        # Newer headers declare it via HINT_UNSAFE_IN_KVM(); IMMEDIATE_EXIT follows either.
        "immediate_exit": "IMMEDIATE_EXIT",
        # C nests the debug exit in `struct kvm_debug_exit_arch arch`; Python flattens it.
        "debug": "debug.arch",
    },
}

# Fields that older headers lack, with the macro added alongside them. One missing field
# then shows up as a single mismatch instead of a compile error hiding every other check.
FIELD_GUARDS: dict[tuple[str, str], str] = {
    ("kvm_clock_data", "realtime"): "KVM_CLOCK_REALTIME",
    ("kvm_clock_data", "host_tsc"): "KVM_CLOCK_REALTIME",
    ("kvm_run", "system_event.ndata"): "KVM_CAP_SYSTEM_EVENT_DATA",
    ("kvm_run", "system_event.data"): "KVM_CAP_SYSTEM_EVENT_DATA",
    ("kvm_vcpu_events", "triple_fault"): "KVM_VCPUEVENT_VALID_TRIPLE_FAULT",
    ("kvm_vcpu_events", "triple_fault.pending"): "KVM_VCPUEVENT_VALID_TRIPLE_FAULT",
}

NOT_IN_HEADER: dict[str, str] = {
    # The kernel's own limit (256 since Linux 5.7) lives in a non-UAPI header.
    "KVM_MAX_CPUID_ENTRIES": "pyvmm's choice of CPUID buffer length, not a kernel ABI value",
}

# (helper, type, nr, argument size): edge values of every bit field of the encoding.
ENCODING_CASES = [
    ("_IO", 0xAE, 0x00, 0),
    ("_IO", 0xFF, 0xFF, 0),
    ("_IOR", 0xAE, 0x81, 8),
    ("_IOW", 0x00, 0x01, 1),
    ("_IOWR", 0xAE, 0xFF, (1 << 14) - 1),
    ("_IOR", 0x12, 0x34, 4096),
]

PRELUDE = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

#ifdef HINT_UNSAFE_IN_KVM
#define IMMEDIATE_EXIT HINT_UNSAFE_IN_KVM(immediate_exit)
#else
#define IMMEDIATE_EXIT immediate_exit
#endif

#define SIZEOF(T) printf("sizeof " #T " %zu\n", sizeof(struct T))
#define FIELD(T, F, KEY)                                                            \
    printf("offsetof " #T " " KEY " %zu\nfieldsize " #T " " KEY " %zu\n",         \
           offsetof(struct T, F), sizeof(((struct T *)0)->F))
#define VALUE(KEY, X) printf("value " KEY " %llu\n", (unsigned long long)(X))

int main(void)
{
"""


def _public_structs() -> dict[str, type[ctypes.Structure]]:
    return {
        name: obj
        for name, obj in vars(structs).items()
        if isinstance(obj, type)
        and issubclass(obj, ctypes.Structure)
        and name.startswith("kvm_")
        and name not in PYTHON_ONLY
    }


def _constants() -> dict[str, int]:
    return {
        name: value
        for module in (numbers, structs)
        for name, value in vars(module).items()
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and type(value) is int
    }


STRUCTS = _public_structs()
CONSTANTS = _constants()
# Variable-length structures come with a `<name>_with(n)` factory adding the entries.
FLEXIBLE: dict[str, Callable[[int], type[ctypes.Structure]]] = {
    name: getattr(structs, f"{name}_with") for name in STRUCTS if hasattr(structs, f"{name}_with")
}


def _fields(cls: CType, prefix: str = "", base: int = 0) -> Iterator[tuple[str, int, int]]:
    """(dotted path, offset, size) of every field, descending into nested structs."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ctype, *_ in cls._fields_:
        offset = base + getattr(cls, name).offset
        path = prefix + name
        # An anonymous member has no name in C; its members are checked instead.
        if name not in anonymous:
            yield path, offset, ctypes.sizeof(ctype)
        if issubclass(ctype, ctypes.Structure | ctypes.Union):
            yield from _fields(ctype, prefix if name in anonymous else path + ".", offset)


def _flexible_field(name: str) -> str:
    return FLEXIBLE[name](1)._fields_[-1][0]


def _c_path(struct: str, path: str) -> str:
    for py, c in C_SPELLING.get(struct, {}).items():
        if path == py or path.startswith(py + "."):
            return c + path[len(py) :]
    return path


def _guarded(struct: str, path: str, line: str) -> list[str]:
    guard = FIELD_GUARDS.get((struct, path))
    return [f"#ifdef {guard}", line, "#endif"] if guard else [line]


def _encoding_key(helper: str, type_: int, nr: int, size: int) -> str:
    return f"{helper}({type_:#x},{nr:#x},{size})"


def _c_source() -> str:
    lines = [PRELUDE]
    for name, cls in STRUCTS.items():
        lines.append(f"SIZEOF({name});")
        for path, _, _ in _fields(cls):
            lines += _guarded(name, path, f'FIELD({name}, {_c_path(name, path)}, "{path}");')
        if name in FLEXIBLE:
            field = _flexible_field(name)
            lines.append(f'FIELD({name}, {field}[0], "{field}[0]");')
    for macro in [*CONSTANTS, *NOT_IN_HEADER]:
        lines += [f"#ifdef {macro}", f'VALUE("{macro}", {macro});', "#endif"]
    for helper, type_, nr, size in ENCODING_CASES:
        # The C helpers take a type and encode its sizeof(); char[n] has size n.
        arg = f", char[{size}]" if helper != "_IO" else ""
        call = f"{helper}({type_:#x}, {nr:#x}{arg})"
        lines.append(f'VALUE("{_encoding_key(helper, type_, nr, size)}", {call});')
    lines.append("return 0;\n}\n")
    return "\n".join(lines)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("PYVMM_REQUIRE_KVM") == "1":
        pytest.fail(f"{reason} (required because PYVMM_REQUIRE_KVM=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory: pytest.TempPathFactory) -> Facts:
    if platform.machine() != "x86_64":
        _unavailable(f"ioctl/ mirrors the x86-64 ABI, this host is {platform.machine()}")
    gcc = shutil.which("gcc")
    if gcc is None:
        _unavailable("gcc not found: install gcc to compare ioctl/ with <linux/kvm.h>")
    if not KVM_H.is_file():
        _unavailable(f"{KVM_H} not found: install linux-libc-dev")
    workdir = tmp_path_factory.mktemp("abi")
    source, program = workdir / "abi.c", workdir / "abi"
    source.write_text(_c_source())
    build = subprocess.run(
        [str(gcc), "-o", str(program), str(source)], capture_output=True, text=True
    )
    assert build.returncode == 0, f"compiling {source} failed:\n{build.stderr}"
    run = subprocess.run([str(program)], capture_output=True, text=True, check=True)
    facts: Facts = {}
    for line in run.stdout.splitlines():
        *key, value = line.split()
        facts[tuple(key)] = int(value)
    return facts


def _assert_same(expected: Facts, actual: Facts, hint: str = "") -> None:
    def show(key: tuple[str, ...], value: int | None) -> str:
        if value is None:
            return "absent from the header"
        # Request numbers only make sense as bit fields.
        return hex(value) if key[0] == "value" else str(value)

    mismatches = [
        f"{' '.join(key)}: Python {show(key, value)}, C {show(key, actual.get(key))}"
        for key, value in expected.items()
        if actual.get(key) != value
    ]
    assert not mismatches, "\n".join(["ioctl/ disagrees with <linux/kvm.h>:", *mismatches, hint])


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_layout(name: str, c_facts: Facts) -> None:
    cls = STRUCTS[name]
    expected: Facts = {("sizeof", name): ctypes.sizeof(cls)}
    for path, offset, size in _fields(cls):
        expected[("offsetof", name, path)] = offset
        expected[("fieldsize", name, path)] = size
    _assert_same(expected, c_facts)


@pytest.mark.parametrize("name", FLEXIBLE)
@pytest.mark.parametrize("count", [1, 3])
def test_flexible_array_factory(name: str, count: int, c_facts: Facts) -> None:
    field = _flexible_field(name)
    cls = FLEXIBLE[name](count)
    array = dict(cls._fields_)[field]
    # The kernel reads the entries right after the header the request number sizes.
    assert cls._fields_[:-1] == STRUCTS[name]._fields_
    assert array._length_ == count
    expected: Facts = {
        ("offsetof", name, f"{field}[0]"): getattr(cls, field).offset,
        ("fieldsize", name, f"{field}[0]"): ctypes.sizeof(array._type_),
    }
    _assert_same(expected, c_facts)


def test_constants_match_header(c_facts: Facts) -> None:
    expected = {("value", n): v for n, v in CONSTANTS.items() if n not in NOT_IN_HEADER}
    _assert_same(expected, c_facts, "List pyvmm-only constants in NOT_IN_HEADER, with a reason.")


@pytest.mark.parametrize("name", NOT_IN_HEADER)
def test_not_in_header_list_is_current(name: str, c_facts: Facts) -> None:
    assert name in CONSTANTS, f"{name} is no longer defined in ioctl/"
    assert ("value", name) not in c_facts, f"<linux/kvm.h> now defines {name}: compare it"


@pytest.mark.parametrize(("helper", "type_", "nr", "size"), ENCODING_CASES)
def test_ioctl_encoding(helper: str, type_: int, nr: int, size: int, c_facts: Facts) -> None:
    encode = getattr(encoding, helper)
    python = encode(type_, nr) if helper == "_IO" else encode(type_, nr, size)
    assert python == c_facts[("value", _encoding_key(helper, type_, nr, size))]


def test_ioctl_encoding_rejects_oversized_argument() -> None:
    with pytest.raises(ValueError, match="14 bits"):
        encoding._IOR(0xAE, 0x00, 1 << 14)
