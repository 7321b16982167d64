#!/usr/bin/env python3
"""Inspect or damage a webkv disk image (the write-ahead log of webkv-v1/v2.elf).

    webkv_disk.py dump DISK [--records]     superblocks, the replayed log, live keys
    webkv_disk.py tear DISK [--keep N]      append a torn record at the log's tail:
                                            a PUT of key "torn-tail" whose last bytes
                                            never reached the disk (first N bytes kept)
    webkv_disk.py corrupt DISK SEQ          flip a byte in record SEQ's value

The format is described in guest_kernels/README.md ("WAL"); this reader follows the
same recovery rules as the guest (wal.c), so `dump` shows what the next boot sees.
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib

SECTOR = 512
SB = struct.Struct(
    "<8sIIQQQQIIQ"
)  # magic version crc generation epoch half_sectors log_base active reserved start_seq
REC = struct.Struct("<IIQIBBHII")  # magic crc seq epoch op flags klen vlen reserved
REC_MAGIC = 0x3152564B
OP_PUT, OP_DEL = 1, 2
MAX_KEY, MAX_BODY = 200, 64 << 10


def rec_size(klen: int, vlen: int) -> int:
    return (32 + klen + vlen + 7) & ~7


def read_superblock(data: bytes) -> dict | None:
    best = None
    for slot in (0, 1):
        sector = bytearray(data[slot * SECTOR : (slot + 1) * SECTOR])
        if len(sector) < SECTOR:
            continue
        f = SB.unpack_from(sector)
        magic, version, crc = f[0], f[1], f[2]
        sector[12:16] = b"\0\0\0\0"
        if magic != b"WEBKVLOG" or version != 1 or zlib.crc32(sector) != crc:
            continue
        names = ("generation", "epoch", "half_sectors", "log_base", "active", "reserved")
        sb = dict(zip((*names, "start_seq"), f[3:], strict=True))
        sb["slot"] = slot
        if best is None or sb["generation"] > best["generation"]:
            best = sb
    return best


def replay(data: bytes, sb: dict):
    """Yield (pos, header dict, key, value) like the guest's recovery; returns via StopIteration."""
    half = sb["half_sectors"] * SECTOR
    base = (sb["log_base"] + sb["active"] * sb["half_sectors"]) * SECTOR
    pos, expect, last_epoch = 0, sb["start_seq"], 0
    while True:
        ok = False
        if pos + 32 <= half:
            h = REC.unpack_from(data, base + pos)
            magic, crc, seq, epoch, op, flags, klen, vlen, _ = h
            size = rec_size(klen, vlen)
            ok = (
                magic == REC_MAGIC
                and seq == expect
                and last_epoch <= epoch <= (sb["epoch"] & 0xFFFFFFFF)
                and not flags
                and op in (OP_PUT, OP_DEL)
                and 1 <= klen <= MAX_KEY
                and vlen <= MAX_BODY
                and not (op == OP_DEL and vlen)
                and pos + size <= half
                and zlib.crc32(data[base + pos + 8 : base + pos + 32 + klen + vlen]) == crc
            )
        if not ok:
            if pos % SECTOR:
                pos = (pos + SECTOR - 1) // SECTOR * SECTOR
                continue
            return pos
        key = data[base + pos + 32 : base + pos + 32 + klen]
        value = data[base + pos + 32 + klen : base + pos + 32 + klen + vlen]
        yield pos, dict(seq=seq, epoch=epoch, op=op, klen=klen, vlen=vlen, size=size), key, value
        expect += 1
        last_epoch = epoch
        pos += size


def scan(data: bytes, sb: dict):
    records, end = [], 0
    for pos, h, key, value in replay(data, sb):
        records.append((pos, h, key, value))
        end = pos + h["size"]
    return records, end


def live_keys(data: bytes) -> dict[bytes, bytes] | None:
    """The keys and values the guest's recovery finds on this image (None: no valid
    superblock, as on a blank disk: the guest would format it, so no keys)."""
    sb = read_superblock(data)
    if sb is None:
        return None
    live: dict[bytes, bytes] = {}
    for _, h, key, value in scan(data, sb)[0]:
        if h["op"] == OP_PUT:
            live[key] = value
        else:
            live.pop(key, None)
    return live


def check_acknowledged(
    data: bytes, acked: dict[str, bytes], deleted: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """Acknowledged writes the image does not hold: keys whose latest acknowledged value
    is not what recovery finds, and acknowledged deletes whose key recovery still has."""
    live = live_keys(data) or {}
    lost = [key for key, value in acked.items() if live.get(key.encode()) != value]
    return lost + [key for key in deleted if key.encode() in live]


def cmd_dump(args) -> int:
    with open(args.disk, "rb") as f:
        data = f.read()
    sb = read_superblock(data)
    if sb is None:
        print("no valid superblock" + (" (blank disk)" if not any(data[: 2 * SECTOR]) else ""))
        return 1
    print("superblock", sb)
    records, end = scan(data, sb)
    live: dict[bytes, bytes] = {}
    for pos, h, key, value in records:
        if args.records:
            op = "PUT" if h["op"] == OP_PUT else "DEL"
            print(
                f"  @{pos} seq={h['seq']} epoch={h['epoch']} {op} "
                f"{key.decode(errors='replace')} vlen={h['vlen']}"
            )
        if h["op"] == OP_PUT:
            live[key] = value
        else:
            live.pop(key, None)
    tail = (end + SECTOR - 1) // SECTOR * SECTOR
    print(f"records={len(records)} log_bytes={end} tail={tail} keys={len(live)}")
    return 0


def cmd_tear(args) -> int:
    with open(args.disk, "r+b") as f:
        data = f.read()
        sb = read_superblock(data)
        if sb is None:
            print("no valid superblock")
            return 1
        records, end = scan(data, sb)
        tail = (end + SECTOR - 1) // SECTOR * SECTOR
        seq = records[-1][1]["seq"] + 1 if records else sb["start_seq"]
        epoch = sb["epoch"] & 0xFFFFFFFF
        key, value = b"torn-tail", b"x" * 3000
        body = REC.pack(0, 0, seq, epoch, OP_PUT, 0, len(key), len(value), 0)[8:] + key + value
        rec = struct.pack("<II", REC_MAGIC, zlib.crc32(body)) + body
        keep = args.keep if args.keep is not None else len(rec) // 2
        base = (sb["log_base"] + sb["active"] * sb["half_sectors"]) * SECTOR
        f.seek(base + tail)
        f.write(rec[:keep])
        half = sb["active"]
        print(f"tore seq={seq} at byte {tail} of half {half}: wrote {keep} of {len(rec)} bytes")
    return 0


def cmd_corrupt(args) -> int:
    with open(args.disk, "r+b") as f:
        data = f.read()
        sb = read_superblock(data)
        records, _ = scan(data, sb)
        base = (sb["log_base"] + sb["active"] * sb["half_sectors"]) * SECTOR
        for pos, h, key, _value in records:
            if h["seq"] == args.seq:
                at = base + pos + 32 + h["klen"] + max(h["vlen"] - 1, 0)
                f.seek(at)
                f.write(bytes([data[at] ^ 0xFF]))
                print(f"flipped byte {at} (record seq={args.seq}, key {key.decode()})")
                return 0
    print("no such record")
    return 1


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("disk")
    d.add_argument("--records", action="store_true")
    t = sub.add_parser("tear")
    t.add_argument("disk")
    t.add_argument("--keep", type=int)
    c = sub.add_parser("corrupt")
    c.add_argument("disk")
    c.add_argument("seq", type=int)
    args = p.parse_args()
    return {"dump": cmd_dump, "tear": cmd_tear, "corrupt": cmd_corrupt}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
