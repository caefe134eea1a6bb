"""FORMAT UNIT (SBC-3 FORMAT UNIT command): "formatting" a virtual disk means zero-filling it.

With IMMED=1 the command completes at once and the fill runs as a ``Background`` job;
otherwise the command completes when the fill does.  Either way ``format_progress`` is
set while it runs, so dispatch answers other commands NOT READY / FORMAT IN PROGRESS
and REQUEST SENSE reports the progress (sg_format polls exactly that).
The fill deallocates when that reads back as zeroes, else uses the handler's WRITE SAME,
else plain writes.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

from ._common import (
    Op,
    bad_cdb,
    bad_param,
    check_writable,
    chunk_bytes,
    param_length_error,
)
from ._model import (
    GOOD,
    Background,
    DeviceState,
    Outcome,
    Result,
    SenseError,
    SenseKey,
    Unmap,
    Write,
    WriteSame,
)
from ._sense import Status, build_sense, error_result, fail

# Deallocation and WRITE SAME move much more per request than a plain write.
_BIG_CHUNK = 64 << 20


def _fill(dev: DeviceState) -> Generator[Any, Any, None]:
    """Zero the whole medium, updating ``format_progress`` (0..65535) as it goes."""
    bs, total = dev.block_size, dev.size
    if dev.caps.unmap and dev.caps.lbprz:
        step, make = _BIG_CHUNK // bs * bs or bs, "unmap"
    elif dev.caps.write_same:
        step, make = _BIG_CHUNK // bs * bs or bs, "write_same"
    else:
        step, make = chunk_bytes(bs), "write"
    zeros = memoryview(bytes(min(step, total))) if make == "write" else None
    block = bytes(bs)
    for off in range(0, total, step):
        length = min(step, total - off)
        if make == "unmap":
            yield Unmap(off, length)
        elif make == "write_same":
            yield WriteSame(off, length, block)
        else:
            assert zeros is not None
            yield Write(off, length, [zeros[:length]])
        dev.format_progress = min(0xFFFF, (off + length) * 0x10000 // total)


def _foreground(dev: DeviceState) -> Generator[Any, Any, Result]:
    """IMMED=0: the command itself formats; a failed fill fails it."""
    dev.format_progress = 0
    try:
        yield from _fill(dev)
    except SenseError:
        return error_result(fail(Status.FORMAT_FAILED), dev)
    finally:
        dev.format_progress = None
    return GOOD


def _background(dev: DeviceState) -> Generator[Any, Any, Result]:
    """IMMED=1: a failed fill becomes a deferred error for REQUEST SENSE (SPC-4 deferred errors)."""
    dev.format_progress = 0
    try:
        yield from _fill(dev)
    except SenseError:
        dev.last_sense = build_sense(SenseKey.MEDIUM_ERROR, 0x31, 0x01, deferred=True)
        return error_result(fail(Status.FORMAT_FAILED), dev)
    finally:
        dev.format_progress = None
    return GOOD


def _start_background(dev: DeviceState) -> Generator[Any, Any, Result]:
    dev.format_progress = 0  # from now on, until the job clears it
    yield Background(_background(dev))
    return GOOD


def format_unit(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SBC-3 FORMAT UNIT."""
    if cdb[1] & 0xC0:
        raise bad_cdb(1, 7)  # FMTPINFO: no protection information
    fmtdata, longlist = bool(cdb[1] & 0x10), bool(cdb[1] & 0x20)
    immed = False
    if fmtdata:
        hlen = 8 if longlist else 4
        if data_len < hlen:
            raise param_length_error("FORMAT UNIT parameter list header truncated")
        hdr = b"".join(iov)[:hlen]
        if hdr[0] & 0x07:
            raise bad_param(0, 2)  # PROTECTION FIELD USAGE
        if longlist and hdr[3]:
            raise bad_param(3, 7)  # P_I_INFORMATION / PROTECTION INTERVAL EXPONENT
        if hdr[1] & 0x08:
            raise bad_param(1, 3)  # IP: no initialization patterns
        if hdr[1] & 0x80 == 0 and hdr[1] & 0x74:
            raise bad_param(1, 6)  # DPRY/DCRT/STPF/DSP need FOV=1 (SBC-3 FORMAT UNIT parameter list header)
        defects = int.from_bytes(hdr[4:8] if longlist else hdr[2:4], "big")
        if defects:
            raise bad_param(4 if longlist else 2, 7)  # no defect lists on a virtual disk
        immed = bool(hdr[1] & 0x02)
    elif data_len:
        raise fail(Status.INVALID_CDB, field=(1, 4, True), message="data sent without FMTDATA")
    check_writable(dev)
    if immed:
        return _start_background(dev)
    return _foreground(dev)


OPS: dict[int, Op] = {
    0x04: Op(format_unit, "FORMAT UNIT", 6, bytes((0x04, 0x30, 0, 0, 0, 0))),
}
