"""READ and WRITE (6)/(10)/(12)/(16) and SYNCHRONIZE CACHE (10)/(16) (SBC-3 READ, WRITE
and SYNCHRONIZE CACHE commands).

READ/WRITE (10)/(16) are the hot path: one precompiled Struct decode, three integer
checks, and the request tuple built with ``tuple.__new__`` (a NamedTuple's own
``__new__`` is a Python function).  READ passes the ring buffers straight through as
``bufs`` so the handler fills them in place.  No logging, no other allocation.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ._common import Op, bad_cdb, check_range, xfer_mismatch
from ._model import GOOD, DeviceState, Flush, Outcome, Read, Write
from ._sense import Status, fail

_RW6 = struct.Struct(">xBHBx")  # LBA bits 20-16, LBA bits 15-0, TRANSFER LENGTH
_RW10 = struct.Struct(">xBIxHx")  # flags, LBA, TRANSFER LENGTH
_RW12 = struct.Struct(">xBIIxx")
_RW16 = struct.Struct(">xBQIxx")
_SYNC10 = struct.Struct(">xxIxHx")  # LBA, NUMBER OF LOGICAL BLOCKS
_SYNC16 = struct.Struct(">xxQIxx")

_new = tuple.__new__


def _protect_field() -> Exception:
    # RDPROTECT/WRPROTECT on a medium without protection information: SBC-3 says
    # INVALID FIELD IN CDB for any non-zero value.
    return bad_cdb(1, 7)


def _too_long() -> Exception:
    # SBC-3 Block Limits VPD page: a transfer beyond MAXIMUM TRANSFER LENGTH is an INVALID FIELD IN CDB.
    return fail(Status.INVALID_CDB, message="transfer length exceeds the block limits")


def _oor() -> Exception:
    return fail(Status.LBA_OUT_OF_RANGE)


# ---- the hot path ------------------------------------------------------------------------


def read10(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    flags, lba, n = _RW10.unpack_from(cdb)
    if flags & 0xE0:
        raise _protect_field()
    if lba + n > dev.num_lbas:
        raise _oor()
    if n * dev.block_size != data_len:
        raise xfer_mismatch(7)
    if n > dev.max_xfer_len:
        raise _too_long()
    if not n:
        return GOOD
    return _new(Read, (lba * dev.block_size, data_len, iov, None))


def read16(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    flags, lba, n = _RW16.unpack_from(cdb)
    if flags & 0xE0:
        raise _protect_field()
    if lba + n > dev.num_lbas:
        raise _oor()
    if n * dev.block_size != data_len:
        raise xfer_mismatch(10)
    if n > dev.max_xfer_len:
        raise _too_long()
    if not n:
        return GOOD
    return _new(Read, (lba * dev.block_size, data_len, iov, None))


def write10(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    flags, lba, n = _RW10.unpack_from(cdb)
    if flags & 0xE0:
        raise _protect_field()
    if dev.caps.readonly:
        raise fail(Status.WRITE_PROTECTED)
    if lba + n > dev.num_lbas:
        raise _oor()
    if n * dev.block_size != data_len:
        raise xfer_mismatch(7)
    if n > dev.max_xfer_len:
        raise _too_long()
    if not n:
        return GOOD
    return _new(
        Write, (lba * dev.block_size, data_len, iov, flags & 0x08 != 0, None)
    )


def write16(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    flags, lba, n = _RW16.unpack_from(cdb)
    if flags & 0xE0:
        raise _protect_field()
    if dev.caps.readonly:
        raise fail(Status.WRITE_PROTECTED)
    if lba + n > dev.num_lbas:
        raise _oor()
    if n * dev.block_size != data_len:
        raise xfer_mismatch(10)
    if n > dev.max_xfer_len:
        raise _too_long()
    if not n:
        return GOOD
    return _new(
        Write, (lba * dev.block_size, data_len, iov, flags & 0x08 != 0, None)
    )


# ---- the rest of the family ----------------------------------------------------------------


def _decode(cdb: bytes) -> tuple[int, int, int, int | None]:
    """(flags, lba, blocks, byte of the transfer length) of a READ/WRITE (6)/(12)."""
    if cdb[0] in (0x08, 0x0A):  # SBC-3 READ (6)/WRITE (6): TRANSFER LENGTH 0 means 256 blocks
        hi, lo, n = _RW6.unpack_from(cdb)
        return 0, (hi & 0x1F) << 16 | lo, n or 256, 4
    flags, lba, n = _RW12.unpack_from(cdb)
    return flags, lba, n, 6


def read_other(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """READ (6) and READ (12)."""
    flags, lba, n, at = _decode(cdb)
    if flags & 0xE0:
        raise _protect_field()
    check_range(dev, lba, n)
    if n * dev.block_size != data_len:
        raise xfer_mismatch(at)
    if n > dev.max_xfer_len:
        raise _too_long()
    if not n:
        return GOOD
    return Read(lba * dev.block_size, data_len, iov)


def write_other(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """WRITE (6) and WRITE (12)."""
    flags, lba, n, at = _decode(cdb)
    if flags & 0xE0:
        raise _protect_field()
    if dev.caps.readonly:
        raise fail(Status.WRITE_PROTECTED)
    check_range(dev, lba, n)
    if n * dev.block_size != data_len:
        raise xfer_mismatch(at)
    if n > dev.max_xfer_len:
        raise _too_long()
    if not n:
        return GOOD
    return Write(lba * dev.block_size, data_len, iov, bool(flags & 0x08))


def synchronize_cache(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    """SBC-3 SYNCHRONIZE CACHE (10)/(16).  The whole cache is flushed whatever the range (allowed: the
    range only says what must at least be synchronized); NUMBER OF LOGICAL BLOCKS 0 means
    to the end of the medium.  A handler without a cache has nothing to do."""
    lba, n = (_SYNC16 if cdb[0] == 0x91 else _SYNC10).unpack_from(cdb)
    check_range(dev, lba, n)
    if dev.caps.flush:
        return Flush()
    return GOOD


_RW10_USE = b"\x18" + b"\xff" * 4 + b"\x00\xff\xff\x00"  # DPO FUA, LBA, -, LENGTH
_RW12_USE = b"\x18" + b"\xff" * 8 + b"\x00\x00"
_RW16_USE = b"\x18" + b"\xff" * 12 + b"\x00\x00"

OPS: dict[int, Op] = {
    0x08: Op(read_other, "READ (6)", 6, bytes((0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0))),
    0x0A: Op(write_other, "WRITE (6)", 6, bytes((0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0))),
    0x28: Op(read10, "READ (10)", 10, b"\x28" + _RW10_USE),
    0x2A: Op(write10, "WRITE (10)", 10, b"\x2a" + _RW10_USE),
    0x35: Op(
        synchronize_cache,
        "SYNCHRONIZE CACHE (10)",
        10,
        bytes((0x35, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0)),
    ),
    0x88: Op(read16, "READ (16)", 16, b"\x88" + _RW16_USE),
    0x8A: Op(write16, "WRITE (16)", 16, b"\x8a" + _RW16_USE),
    0x91: Op(synchronize_cache, "SYNCHRONIZE CACHE (16)", 16, b"\x91\x00" + b"\xff" * 12 + b"\0\0"),
    0xA8: Op(read_other, "READ (12)", 12, b"\xa8" + _RW12_USE),
    0xAA: Op(write_other, "WRITE (12)", 12, b"\xaa" + _RW12_USE),
}
