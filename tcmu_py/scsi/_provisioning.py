"""Logical block provisioning: WRITE SAME (10)/(16), UNMAP and GET LBA STATUS
(SBC-3 GET LBA STATUS, UNMAP, WRITE SAME (10)/(16); SBC-4 for NDOB).

WRITE SAME with the UNMAP bit deallocates only when that keeps its promise -- reads
afterwards return the Data-Out block -- i.e. for a zero block on a handler whose
unmapped blocks read back zero (LBPRZ); otherwise it writes.  Without a native
``write_same`` the block is written out in chunks.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Iterable, Sequence
from typing import Any

from ._common import (
    Op,
    bad_cdb,
    bad_param,
    check_range,
    check_writable,
    chunk_bytes,
    data_in,
    guarded,
    param_length_error,
    param_list,
    sa_key,
    xfer_mismatch,
)
from ._model import GOOD, DeviceState, GetLbaStatus, Outcome, Result, Unmap, Write, WriteSame
from ._sense import Status, fail

_WS10 = struct.Struct(">xBIxHx")
_WS16 = struct.Struct(">xBQIxx")
_DESC = struct.Struct(">QIxxxx")  # UNMAP block descriptor
_LBA_STATUS = struct.Struct(">QIBxxx")  # LBA status descriptor


def _can_unmap(dev: DeviceState) -> bool:
    return dev.caps.unmap


def _can_get_lba_status(dev: DeviceState) -> bool:
    return dev.caps.get_lba_status


# ---- WRITE SAME ---------------------------------------------------------------------------


def _write_same(
    dev: DeviceState, lba: int, n: int, pattern: bytes, may_unmap: bool
) -> Generator[Any, Any, Result]:
    bs = dev.block_size
    start, total = lba * bs, n * bs
    if may_unmap and dev.caps.lbprz and pattern == bytes(bs):
        yield Unmap(start, total)
        return GOOD
    if dev.caps.write_same:
        yield WriteSame(start, total, pattern, may_unmap)
        return GOOD
    step = chunk_bytes(bs)
    buf = memoryview(pattern * (min(step, total) // bs))
    for off in range(start, start + total, step):
        length = min(step, start + total - off)
        yield Write(off, length, [buf[:length]])
    return GOOD


def write_same(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SBC-3 WRITE SAME (10) / (16) (SBC-4 for NDOB)."""
    sixteen = cdb[0] == 0x93
    flags, lba, n = (_WS16 if sixteen else _WS10).unpack_from(cdb)
    at = 10 if sixteen else 7
    if flags & 0xE0:
        raise bad_cdb(1, 7)  # WRPROTECT without protection information
    if flags & 0x10:
        raise bad_cdb(1, 4)  # ANCHOR with ANC_SUP=0 (SBC-4 Table 237: error)
    if flags & (0x06 if sixteen else 0x07):
        raise bad_cdb(1, 2 if flags & 0x04 else (1 if flags & 0x02 else 0))  # PBDATA/LBDATA
    ndob = sixteen and bool(flags & 0x01)
    if n == 0:
        raise bad_cdb(at, 7)  # WSNZ=1 in the Block Limits page
    if n > dev.max_write_same_lbas:
        raise bad_cdb(at, 7)  # beyond MAXIMUM WRITE SAME LENGTH
    check_writable(dev)
    check_range(dev, lba, n)
    bs = dev.block_size
    if data_len != (0 if ndob else bs):
        raise xfer_mismatch(None)
    pattern = bytes(bs) if ndob else b"".join(iov)[:bs]
    may_unmap = bool(flags & 0x08) and dev.caps.unmap
    return guarded(dev, _write_same(dev, lba, n, pattern, may_unmap))


# ---- UNMAP -------------------------------------------------------------------------------


def _unmap(dev: DeviceState, ranges: list[tuple[int, int]]) -> Generator[Any, Any, Result]:
    bs = dev.block_size
    for lba, n in ranges:
        yield Unmap(lba * bs, n * bs)
    return GOOD


def unmap(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SBC-3 UNMAP: every descriptor is validated before anything is unmapped."""
    declared = int.from_bytes(cdb[7:9], "big")
    if cdb[1] & 0x01:
        raise bad_cdb(1, 0)  # ANCHOR with ANC_SUP=0
    check_writable(dev)
    if declared == 0:  # "no data shall be sent; not an error"
        return GOOD
    if declared < 8:
        raise param_length_error("UNMAP parameter list shorter than its header")
    data = param_list(iov, data_len, declared)
    bddl = int.from_bytes(data[2:4], "big")
    # Descriptors cut short by the parameter list length are ignored (5.28.2).
    count = min(bddl, declared - 8) // 16
    if count > dev.max_unmap_descs:
        raise bad_param(2, 7)  # beyond MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
    ranges, total = [], 0
    for i in range(count):
        lba, n = _DESC.unpack_from(data, 8 + 16 * i)
        check_range(dev, lba, n)
        total += n
        if total > dev.max_unmap_lbas:
            raise bad_param(8 + 16 * i + 8, 7)  # beyond MAXIMUM UNMAP LBA COUNT
        if n:
            ranges.append((lba, n))
    if not ranges:
        return GOOD
    return guarded(dev, _unmap(dev, ranges))


# ---- GET LBA STATUS ------------------------------------------------------------------------


def _descriptors(
    dev: DeviceState, lba: int, extents: Iterable[tuple[int, int, int]], room: int
) -> list[tuple[int, int, int]]:
    """Turn the handler's byte extents into contiguous (lba, blocks, status) descriptors
    from ``lba`` on: sorted, clipped to the device, gaps reported as mapped, neighbours
    of equal status merged, counts split at 32 bits, at most ``room`` of them."""
    bs, end = dev.block_size, dev.num_lbas
    spans: list[list[int]] = []
    cur = lba
    for off, length, status in sorted(extents):
        first, last = max(off // bs, cur), min(-(-(off + length) // bs), end)
        if last <= first:
            continue
        if first > cur:
            spans.append([cur, first - cur, 0])
        st = status & 0x0F
        if spans and spans[-1][2] == st and spans[-1][0] + spans[-1][1] == first:
            spans[-1][1] += last - first
        else:
            spans.append([first, last - first, st])
        cur = last
        if cur >= end:
            break
    if not spans:
        spans.append([lba, end - lba, 0])
    out: list[tuple[int, int, int]] = []
    for first, count, st in spans:
        while count and len(out) < room:
            take = min(count, 0xFFFFFFFF)
            out.append((first, take, st))
            first, count = first + take, count - take
    return out


def _get_lba_status(dev: DeviceState, lba: int, alloc: int) -> Generator[Any, Any, Result]:
    bs = dev.block_size
    extents = yield GetLbaStatus(lba * bs, (dev.num_lbas - lba) * bs)
    room = max(1, (alloc - 8) // 16)
    descs = _descriptors(dev, lba, extents or (), room)
    body = b"".join(_LBA_STATUS.pack(*d) for d in descs)
    data = (4 + len(body)).to_bytes(4, "big") + bytes(4) + body  # PARAMETER DATA LENGTH
    return data_in(data, alloc)


def get_lba_status(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    """SBC-3 GET LBA STATUS."""
    lba = int.from_bytes(cdb[2:10], "big")
    alloc = int.from_bytes(cdb[10:14], "big")
    if lba >= dev.num_lbas:
        raise fail(Status.LBA_OUT_OF_RANGE)
    if alloc == 0:
        return GOOD
    return guarded(dev, _get_lba_status(dev, lba, alloc))


OPS: dict[int, Op] = {
    0x41: Op(
        write_same,
        "WRITE SAME (10)",
        10,
        bytes((0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0)),
    ),
    0x42: Op(unmap, "UNMAP", 10, bytes((0x42, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0)), _can_unmap),
    0x93: Op(write_same, "WRITE SAME (16)", 16, b"\x93\x09" + b"\xff" * 12 + b"\0\0"),
    sa_key(0x9E, 0x12): Op(
        get_lba_status,
        "GET LBA STATUS",
        16,
        b"\x9e\x1f" + b"\xff" * 12 + b"\0\0",
        _can_get_lba_status,
    ),
}
