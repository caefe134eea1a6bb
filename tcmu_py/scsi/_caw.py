"""COMPARE AND WRITE (SBC-3 COMPARE AND WRITE command): VMware's ATS lock primitive.

Atomicity comes from the engine, which runs the COMPARE AND WRITE generators of a
device one at a time; this module only says what to do: a native ``compare_and_write``
when the handler has one, else read, compare, and write.
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
    first_difference,
    guarded,
    write_through,
    xfer_mismatch,
)
from ._model import GOOD, CompareAndWrite, DeviceState, Flush, Outcome, Read, Result
from ._sense import Status, fail

_CAW = struct.Struct(">xBQxxxBxx")  # flags, LBA, NUMBER OF LOGICAL BLOCKS
MAX_CAW_BLOCKS = 1  # VPD B0h MAXIMUM COMPARE AND WRITE LENGTH


def _native(
    dev: DeviceState, offset: int, verify: bytes, data: bytes, fua: bool
) -> Generator[Any, Any, Result]:
    yield CompareAndWrite(offset, verify, data)  # a mismatch is thrown in as MISCOMPARE
    if fua and not dev.caps.fua and dev.caps.flush:
        yield Flush()
    return GOOD


def _emulated(
    dev: DeviceState, offset: int, verify: bytes, data: bytes, fua: bool
) -> Generator[Any, Any, Result]:
    current = yield Read(offset, len(verify), None)
    diff = first_difference(current, verify)
    if diff >= 0:
        # SBC-3 COMPARE AND WRITE: INFORMATION = offset of the first differing byte in the Data-Out Buffer
        raise fail(Status.MISCOMPARE, info=diff)
    yield from write_through(dev, offset, len(data), [data], fua)
    return GOOD


def compare_and_write(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    flags, lba, n = _CAW.unpack_from(cdb)
    if flags & 0xE0:
        raise bad_cdb(1, 7)  # WRPROTECT without protection information
    if n > MAX_CAW_BLOCKS:
        raise bad_cdb(13, 7)
    check_writable(dev)
    check_range(dev, lba, n)
    half = n * dev.block_size
    if data_len != 2 * half:  # the verify instance, then the write instance
        raise xfer_mismatch(13)
    if not n:  # "no read, no comparison, no write; not an error"
        return GOOD
    buf = b"".join(iov)
    verify, data = buf[:half], buf[half : 2 * half]
    fua = bool(flags & 0x08)
    run = _native if dev.caps.caw else _emulated
    return guarded(dev, run(dev, lba * dev.block_size, verify, data, fua))


OPS: dict[int, Op] = {
    0x89: Op(
        compare_and_write,
        "COMPARE AND WRITE",
        16,
        b"\x89\x18" + b"\xff" * 8 + b"\0\0\0\xff\0\0",
    ),
}
