"""VERIFY (10)/(12)/(16) and WRITE AND VERIFY (10)/(12)/(16) (SBC-3 VERIFY and
WRITE AND VERIFY commands, BYTCHK as SBC-4 defines it).

Verification reads the blocks back through the handler: a medium verification
(BYTCHK 00b) succeeds when they are readable, a byte-by-byte one (01b, or 11b with one
block compared against every block) fails with MISCOMPARE DURING VERIFY OPERATION and
the offset of the first differing byte in the INFORMATION field.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Sequence
from typing import Any

from ._common import (
    Op,
    bad_cdb,
    check_range,
    check_writable,
    chunk_bytes,
    first_difference,
    guarded,
    write_through,
    xfer_mismatch,
)
from ._model import GOOD, DeviceState, Outcome, Read, Result
from ._sense import Status, fail

_V10 = struct.Struct(">xBIxHx")
_V12 = struct.Struct(">xBIIxx")
_V16 = struct.Struct(">xBQIxx")

# opcode -> (struct, byte of the length field)
_LAYOUT = {
    0x2F: (_V10, 7), 0xAF: (_V12, 6), 0x8F: (_V16, 10),
    0x2E: (_V10, 7), 0xAE: (_V12, 6), 0x8E: (_V16, 10),
}


def _compare_blocks(
    dev: DeviceState, lba: int, n: int, expected: bytes, repeat: bool
) -> Generator[Any, Any, Result]:
    """Read lba..lba+n in chunks; compare with ``expected`` (one block, for every block,
    when ``repeat``; else the whole range).  Empty ``expected``: only read."""
    bs = dev.block_size
    step = chunk_bytes(bs)
    start, end = lba * bs, (lba + n) * bs
    pattern = expected * (step // bs) if repeat and expected else b""
    for off in range(start, end, step):
        length = min(step, end - off)
        got = yield Read(off, length, None)
        if not expected:
            continue
        want = pattern[:length] if repeat else expected[off - start : off - start + length]
        diff = first_difference(got, want)
        if diff >= 0:
            # the offset counts from the start of the (logically repeated) data-out
            raise fail(Status.MISCOMPARE, info=off - start + diff)
    return GOOD


def verify(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SBC-3 VERIFY (10)/(12)/(16)."""
    layout, at = _LAYOUT[cdb[0]]
    flags, lba, n = layout.unpack_from(cdb)
    if flags & 0xE0:
        raise bad_cdb(1, 7)  # VRPROTECT without protection information
    bytchk = (flags >> 1) & 0x03
    if bytchk == 0b10:
        raise bad_cdb(1, 2)  # reserved BYTCHK value
    check_range(dev, lba, n)
    want = {0b00: 0, 0b01: n * dev.block_size, 0b11: dev.block_size if n else 0}[bytchk]
    if data_len != want:
        raise xfer_mismatch(at)
    if bytchk == 0b01 and n > dev.max_xfer_len:
        raise fail(Status.INVALID_CDB, message="verification length exceeds the block limits")
    if not n:  # "no logical blocks shall be verified; not an error"
        return GOOD
    expected = b"".join(iov)[:want] if bytchk else b""
    return guarded(dev, _compare_blocks(dev, lba, n, expected, bytchk == 0b11))


def _write_and_verify(
    dev: DeviceState, lba: int, n: int, iov: Sequence[memoryview], data_len: int, compare: bool
) -> Generator[Any, Any, Result]:
    # FUA: the verification must see the medium, not a cache (SBC-3 WRITE AND VERIFY).
    yield from write_through(dev, lba * dev.block_size, data_len, iov, True)
    expected = b"".join(iov) if compare else b""
    return (yield from _compare_blocks(dev, lba, n, expected, False))


def write_and_verify(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    """SBC-3 WRITE AND VERIFY (10)/(12)/(16)."""
    layout, at = _LAYOUT[cdb[0]]
    flags, lba, n = layout.unpack_from(cdb)
    if flags & 0xE0:
        raise bad_cdb(1, 7)  # WRPROTECT without protection information
    if flags & 0x04:
        raise bad_cdb(1, 2)  # BYTCHK 1xb: reserved
    check_writable(dev)
    check_range(dev, lba, n)
    if data_len != n * dev.block_size:
        raise xfer_mismatch(at)
    if n > dev.max_xfer_len:
        raise fail(Status.INVALID_CDB, message="transfer length exceeds the block limits")
    if not n:
        return GOOD
    return guarded(dev, _write_and_verify(dev, lba, n, iov, data_len, bool(flags & 0x02)))


_USE10 = b"\xff" * 4 + b"\x00\xff\xff\x00"
_USE12 = b"\xff" * 8 + b"\x00\x00"
_USE16 = b"\xff" * 12 + b"\x00\x00"

OPS: dict[int, Op] = {
    0x2E: Op(write_and_verify, "WRITE AND VERIFY (10)", 10, b"\x2e\x16" + _USE10),
    0x2F: Op(verify, "VERIFY (10)", 10, b"\x2f\x16" + _USE10),
    0x8E: Op(write_and_verify, "WRITE AND VERIFY (16)", 16, b"\x8e\x16" + _USE16),
    0x8F: Op(verify, "VERIFY (16)", 16, b"\x8f\x16" + _USE16),
    0xAE: Op(write_and_verify, "WRITE AND VERIFY (12)", 12, b"\xae\x16" + _USE12),
    0xAF: Op(verify, "VERIFY (12)", 12, b"\xaf\x16" + _USE12),
}
