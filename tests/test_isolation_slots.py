"""Slot bookkeeping and refusal logging of memory isolation, without KVM."""

from __future__ import annotations

import logging

import pytest

from pyvmm.memory import GuestMemory
from pyvmm.microvisor.isolation import NONE, PROTECT_FIRST, PartitionSlots, RefusalLog

MiB = 1 << 20


class FakeVm:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_user_memory_region(self, slot: int, gpa: int, size: int, host: int) -> None:
        self.calls.append(("create", slot, gpa, size, host))

    def delete_memory_region(self, slot: int) -> None:
        self.calls.append(("delete", slot))


@pytest.fixture
def memory():
    with GuestMemory(8 * MiB, partitions=2) as mem:
        yield mem


def test_one_slot_per_partition(memory):
    slots = list(memory.slots())
    assert [(s.slot, s.gpa, s.size) for s in slots] == [(0, 0, 4 * MiB), (1, 4 * MiB, 4 * MiB)]
    assert slots[1].host_address == memory.host_address + 4 * MiB


def test_a_switch_deletes_the_outgoing_slot_before_creating_the_incoming(memory):
    vm = FakeVm()
    slots = PartitionSlots(vm, memory)  # type: ignore[arg-type]
    a, b = memory.partitions
    slots.enter(a, [a])  # the first instance alone: the spare partition goes
    assert vm.calls == [("delete", 1)] and slots.mapped == {0}
    vm.calls.clear()
    slots.enter(b, [a, b])
    assert vm.calls == [
        ("delete", 0),
        ("create", 1, 4 * MiB, 4 * MiB, memory.host_address + 4 * MiB),
    ]
    assert slots.mapped == {1}
    vm.calls.clear()
    slots.enter(b, [a, b])  # already right: nothing changes
    assert vm.calls == [] and slots.updates == 3
    assert len(slots.change_latency) == 2 and slots.first_update_s is not None


def test_protect_first_maps_everything_for_the_trusted_instance_only(memory):
    vm = FakeVm()
    slots = PartitionSlots(vm, memory, PROTECT_FIRST)  # type: ignore[arg-type]
    a, b = memory.partitions
    slots.enter(a, [a])
    slots.trusted = a
    vm.calls.clear()
    slots.enter(a, [a, b])  # b booted: a, the old instance, may still reach it
    assert vm.calls[0][:2] == ("create", 1) and slots.mapped == {0, 1}
    vm.calls.clear()
    slots.enter(b, [a, b])  # one deletion per switch instead of two
    assert vm.calls == [("delete", 0)]
    vm.calls.clear()
    slots.enter(a, [a, b])
    assert [c[:2] for c in vm.calls] == [("create", 0)]


def test_devirtualized_only_the_survivors_slot_stays_but_in_mode_none(memory):
    a, b = memory.partitions
    vm = FakeVm()
    slots = PartitionSlots(vm, memory, PROTECT_FIRST)  # type: ignore[arg-type]
    slots.trusted = a
    slots.enter(a, [a, b])
    slots.alone(b)
    assert slots.mapped == {1}
    vm = FakeVm()
    slots = PartitionSlots(vm, memory, NONE)  # type: ignore[arg-type]
    slots.enter(b, [a, b])
    slots.alone(a)
    assert slots.mapped == {0, 1} and vm.calls == []


def test_unknown_isolation_mode_is_refused(memory):
    with pytest.raises(ValueError, match="isolation mode"):
        PartitionSlots(FakeVm(), memory, "sometimes")  # type: ignore[arg-type]


def test_refusals_are_logged_ten_a_second_then_counted(caplog):
    now = [100.0]
    log = RefusalLog("b", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="pyvmm.microvisor"):
        for i in range(25):
            log.refused("refused write of %#x", i)
        assert len(caplog.records) == 10 and log.suppressed == 15
        now[0] += 0.5
        log.refused("refused write of %#x", 99)  # same second: still suppressed
        assert len(caplog.records) == 10
        now[0] += 0.6
        log.refused("refused write of %#x", 100)  # a new second: the count, then the line
        messages = [r.getMessage() for r in caplog.records]
    assert messages[10] == "b: 16 more refused accesses suppressed"
    assert messages[11] == "b: refused write of 0x64"
    assert log.suppressed == 0
    log.flush()
    assert len(caplog.records) == 12  # nothing left to report
