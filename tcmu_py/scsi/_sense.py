"""Sense data: the one status -> sense table, fixed and descriptor encodings, the errno
mapping at the handler boundary, and unit attentions.

Every error in this layer is a :class:`SenseError` built from :data:`STATUS_SENSE`, so
the answer to "what does the initiator see for X" lives in one literal table
(``reference/tcmu.md`` §2.6 lists tcmu-runner's equivalent).  Sense encodings follow
SPC-4 "Sense data" (descriptor and fixed formats, sense-key specific data).
"""

from __future__ import annotations

import errno as _errno
from enum import Enum, auto

from ._model import DeviceState, Result, Sam, SenseError, SenseKey


class Status(Enum):
    """What went wrong, independent of how SCSI spells it (see :data:`STATUS_SENSE`)."""

    BUSY = auto()
    TASK_SET_FULL = auto()
    NO_SENSE = auto()
    FORMAT_IN_PROGRESS = auto()
    TRANSITIONING = auto()
    FENCED = auto()
    READ_ERROR = auto()
    WRITE_ERROR = auto()
    FORMAT_FAILED = auto()
    PARAM_LIST_LENGTH = auto()
    MISCOMPARE = auto()
    INVALID_OPCODE = auto()
    LBA_OUT_OF_RANGE = auto()
    INVALID_CDB = auto()
    INVALID_PARAM = auto()
    TOO_MANY_TARGET_DESCS = auto()
    UNSUPPORTED_TARGET_DESC = auto()
    TOO_MANY_SEGMENT_DESCS = auto()
    UNSUPPORTED_SEGMENT_DESC = auto()
    WRITE_PROTECTED = auto()
    SPACE_EXHAUSTED = auto()
    SAVING_NOT_SUPPORTED = auto()
    HARDWARE_ERROR = auto()
    COPY_TARGET_UNREACHABLE = auto()
    COPY_TARGET_TYPE = auto()
    RESET_OCCURRED = auto()
    CAPACITY_CHANGED = auto()
    ALUA_STATE_CHANGED = auto()
    IMPLICIT_TRANSITION_FAILED = auto()


_CC, _IR = Sam.CHECK_CONDITION, SenseKey.ILLEGAL_REQUEST

# The one status -> (SAM status, sense key, ASC, ASCQ) table.  ASC/ASCQ names are
# SPC-4 Annex D; the sense keys SPC-4 Table 48.
STATUS_SENSE: dict[Status, tuple[int, int, int, int]] = {
    Status.BUSY: (Sam.BUSY, 0, 0, 0),
    Status.TASK_SET_FULL: (Sam.TASK_SET_FULL, 0, 0, 0),
    Status.NO_SENSE: (Sam.GOOD, SenseKey.NO_SENSE, 0x00, 0x00),
    Status.FORMAT_IN_PROGRESS: (_CC, SenseKey.NOT_READY, 0x04, 0x04),
    Status.TRANSITIONING: (_CC, SenseKey.NOT_READY, 0x04, 0x0A),  # asymmetric access transition
    Status.FENCED: (_CC, SenseKey.NOT_READY, 0x04, 0x0B),  # target port in standby state
    Status.READ_ERROR: (_CC, SenseKey.MEDIUM_ERROR, 0x11, 0x00),  # unrecovered read error
    Status.WRITE_ERROR: (_CC, SenseKey.MEDIUM_ERROR, 0x0C, 0x00),
    Status.FORMAT_FAILED: (_CC, SenseKey.MEDIUM_ERROR, 0x31, 0x01),  # format command failed
    Status.PARAM_LIST_LENGTH: (_CC, _IR, 0x1A, 0x00),
    Status.MISCOMPARE: (_CC, SenseKey.MISCOMPARE, 0x1D, 0x00),  # miscompare during verify
    Status.INVALID_OPCODE: (_CC, _IR, 0x20, 0x00),
    Status.LBA_OUT_OF_RANGE: (_CC, _IR, 0x21, 0x00),
    Status.INVALID_CDB: (_CC, _IR, 0x24, 0x00),
    Status.INVALID_PARAM: (_CC, _IR, 0x26, 0x00),
    Status.TOO_MANY_TARGET_DESCS: (_CC, _IR, 0x26, 0x06),
    Status.UNSUPPORTED_TARGET_DESC: (_CC, _IR, 0x26, 0x07),
    Status.TOO_MANY_SEGMENT_DESCS: (_CC, _IR, 0x26, 0x08),
    Status.UNSUPPORTED_SEGMENT_DESC: (_CC, _IR, 0x26, 0x09),
    Status.WRITE_PROTECTED: (_CC, SenseKey.DATA_PROTECT, 0x27, 0x00),
    Status.SPACE_EXHAUSTED: (_CC, SenseKey.DATA_PROTECT, 0x27, 0x07),  # SBC-3 thin provisioning
    Status.SAVING_NOT_SUPPORTED: (_CC, _IR, 0x39, 0x00),
    Status.HARDWARE_ERROR: (_CC, SenseKey.HARDWARE_ERROR, 0x44, 0x00),  # internal target failure
    Status.COPY_TARGET_UNREACHABLE: (_CC, SenseKey.COPY_ABORTED, 0x0D, 0x02),
    Status.COPY_TARGET_TYPE: (_CC, SenseKey.COPY_ABORTED, 0x0D, 0x03),
    Status.RESET_OCCURRED: (_CC, SenseKey.UNIT_ATTENTION, 0x29, 0x00),
    Status.CAPACITY_CHANGED: (_CC, SenseKey.UNIT_ATTENTION, 0x2A, 0x09),
    Status.ALUA_STATE_CHANGED: (_CC, SenseKey.UNIT_ATTENTION, 0x2A, 0x06),
    Status.IMPLICIT_TRANSITION_FAILED: (_CC, SenseKey.UNIT_ATTENTION, 0x2A, 0x07),
}

# Handler errno -> status (EIO depends on the direction, see errno_to_sense).
_ERRNO_STATUS: dict[int, Status] = {
    _errno.ENOSPC: Status.SPACE_EXHAUSTED,
    _errno.EDQUOT: Status.SPACE_EXHAUSTED,
    _errno.EROFS: Status.WRITE_PROTECTED,
    _errno.ESHUTDOWN: Status.FENCED,  # rbd: blocklisted, the lock is gone (§2.8)
    _errno.ETIMEDOUT: Status.BUSY,
    _errno.EBUSY: Status.BUSY,
    _errno.EAGAIN: Status.BUSY,
    _errno.ENOMEM: Status.TASK_SET_FULL,
}


def fail(
    status: Status,
    *,
    info: int | None = None,
    field: tuple[int, int | None, bool] | None = None,
    message: str = "",
) -> SenseError:
    """The SenseError for ``status`` (raise it)."""
    sam, key, asc, ascq = STATUS_SENSE[status]
    return SenseError(key, asc, ascq, info=info, field=field, status=sam, message=message)


def errno_to_sense(errno: int, *, write: bool = False) -> SenseError:
    """Translate a handler's errno at the handler boundary (style.md §3).

    EIO is a MEDIUM ERROR: UNRECOVERED READ ERROR, or WRITE ERROR when ``write``;
    anything not in the table is a HARDWARE ERROR / INTERNAL TARGET FAILURE.
    """
    if errno == _errno.EIO:
        return fail(Status.WRITE_ERROR if write else Status.READ_ERROR)
    return fail(_ERRNO_STATUS.get(errno, Status.HARDWARE_ERROR))


def _sks(
    field: tuple[int, int | None, bool] | None, progress: int | None
) -> bytes | None:
    """The 3-byte sense-key specific field (SPC-4 sense-key specific data), or None."""
    if progress is not None:  # progress indication
        p = max(0, min(progress, 0xFFFF))
        return bytes((0x80, p >> 8, p & 0xFF))
    if field is not None:  # field pointer
        byte, bit, in_cdb = field
        b0 = 0x80 | (0x40 if in_cdb else 0)
        if bit is not None:
            b0 |= 0x08 | (bit & 0x07)
        byte = min(max(byte, 0), 0xFFFF)
        return bytes((b0, byte >> 8, byte & 0xFF))
    return None


def build_sense(
    key: int,
    asc: int,
    ascq: int,
    *,
    info: int | None = None,
    field: tuple[int, int | None, bool] | None = None,
    progress: int | None = None,
    descriptor: bool = False,
    deferred: bool = False,
) -> bytes:
    """Encode sense data: fixed format (18 bytes) or descriptor format."""
    sks = _sks(field, progress)
    if descriptor:
        out = bytearray((0x73 if deferred else 0x72, key & 0x0F, asc, ascq, 0, 0, 0, 0))
        if info is not None:  # information sense data descriptor
            out += bytes((0x00, 0x0A, 0x80, 0x00)) + (info & (2**64 - 1)).to_bytes(8, "big")
        if sks is not None:  # sense key specific sense data descriptor
            out += bytes((0x02, 0x06, 0x00, 0x00)) + sks + b"\x00"
        out[7] = len(out) - 8
        return bytes(out)
    out = bytearray(18)
    out[0] = 0x71 if deferred else 0x70
    out[2] = key & 0x0F
    if info is not None and 0 <= info <= 0xFFFFFFFF:
        out[0] |= 0x80  # VALID: the INFORMATION field holds ``info``
        out[3:7] = info.to_bytes(4, "big")
    out[7] = 10
    out[12], out[13] = asc, ascq
    if sks is not None:
        out[15:18] = sks
    return bytes(out)


def sense_for(err: SenseError, descriptor: bool = False) -> bytes:
    """The sense bytes for ``err`` (fixed format unless ``descriptor``)."""
    return build_sense(
        err.key,
        err.asc,
        err.ascq,
        info=err.info,
        field=err.field,
        progress=getattr(err, "progress", None),
        descriptor=descriptor,
    )


def check_condition(
    key: int,
    asc: int,
    ascq: int,
    *,
    info: int | None = None,
    field: tuple[int, int | None, bool] | None = None,
    descriptor: bool = False,
) -> Result:
    """A CHECK CONDITION result with freshly built sense."""
    return Result(
        Sam.CHECK_CONDITION,
        build_sense(key, asc, ascq, info=info, field=field, descriptor=descriptor),
    )


def wants_descriptor_sense(dev: DeviceState) -> bool:
    """D_SENSE of the Control mode page (SPC-4), as MODE SELECT last set it."""
    return bool(dev.mode_overrides.get((0x0A, 2), 0) & 0x04)


def error_result(err: SenseError, dev: DeviceState | None = None) -> Result:
    """The Result a SenseError completes its command with (honouring D_SENSE)."""
    if err.status != Sam.CHECK_CONDITION:
        return Result(err.status)
    descriptor = dev is not None and wants_descriptor_sense(dev)
    return Result(Sam.CHECK_CONDITION, sense_for(err, descriptor))


def add_unit_attention(dev: DeviceState, asc: int, ascq: int) -> None:
    """Queue a unit attention for the next command (SAM-5 unit attention condition).

    A reset supersedes whatever was pending (SPC-4 asks for the highest-precedence
    condition only); the same condition is never queued twice.
    """
    ua = (asc, ascq)
    if asc == 0x29:
        dev.pending_ua.clear()
    if ua not in dev.pending_ua:
        dev.pending_ua.append(ua)
