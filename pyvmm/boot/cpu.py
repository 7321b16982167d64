"""The CPU state at the PVH entry point, as plain data (applied to a vCPU by the machine).

PVH entry: 32-bit protected mode, paging off, flat 4 GiB code and data segments,
EBX = guest-physical address of the start-info, all other state unspecified.
"""

from __future__ import annotations

from ..record import Record


class SegmentState(Record, frozen=True):
    selector: int
    type: int
    base: int = 0
    limit: int = 0xFFFF_FFFF
    present: int = 1
    dpl: int = 0
    db: int = 1  # 32-bit
    s: int = 1  # code/data, not system
    l: int = 0  # noqa: E741 - the name of the descriptor bit
    g: int = 1


CR0_PE = 1 << 0
CR0_ET = 1 << 4
RFLAGS_RESERVED = 1 << 1

# Segment types: 0xb = execute/read, accessed; 0x3 = read/write, accessed;
# 0xb with s=0 = busy 32-bit TSS.
FLAT_CODE32 = SegmentState(selector=0x10, type=0xB)
FLAT_DATA32 = SegmentState(selector=0x18, type=0x3)
BOOT_TSS = SegmentState(selector=0x20, type=0xB, limit=0x67, s=0, db=0, g=0)


class EntryState(Record, frozen=True):
    rip: int
    rbx: int
    rflags: int = RFLAGS_RESERVED
    cr0: int = CR0_PE | CR0_ET
    cr4: int = 0
    efer: int = 0
    code: SegmentState = FLAT_CODE32
    data: SegmentState = FLAT_DATA32
    tss: SegmentState = BOOT_TSS


def pvh_entry_state(entry: int, start_info: int) -> EntryState:
    return EntryState(rip=entry, rbx=start_info)
