"""What every command family shares: the opcode-table entry, CDB and parameter-list
checks that raise the right sense, allocation-length truncation, and a guard that
turns the errors of a compound command into its Result.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple

from ._model import GOOD, Compound, DeviceState, Flush, Outcome, Result, Sam, SenseError, Write
from ._sense import Status, error_result, fail

Handler = Callable[[bytes, Sequence[memoryview], int, DeviceState], Outcome]

# Compound commands move data in chunks of about this many bytes (a multiple of the
# block size): big enough to keep handler calls few, small enough not to hog memory.
CHUNK = 1 << 20


class Op(NamedTuple):
    """One entry of the literal opcode table.

    ``usage`` is the CDB USAGE DATA of REPORT SUPPORTED OPERATION CODES (SPC-4
    one_command format): the opcode, then a mask of every CDB bit this layer evaluates
    (bits it only checks to refuse count as reserved, so they are 0); ``needs`` says
    whether this device serves the command (None: always).
    """

    fn: Handler
    name: str
    cdb_len: int
    usage: bytes
    needs: Callable[[DeviceState], bool] | None = None


# Opcodes whose byte 1 (bits 4-0) holds a SERVICE ACTION: their table keys are sa_key().
SA_OPCODES = frozenset({0x83, 0x84, 0x9E, 0xA3, 0xA4})
_SA = 0x10000


def sa_key(opcode: int, sa: int) -> int:
    """Table key of a service-action command (plain opcodes are keys 0..255)."""
    return _SA | opcode << 8 | sa


def split_key(key: int) -> tuple[int, int | None]:
    """(opcode, service action or None) of a table key."""
    if key & _SA:
        return (key >> 8) & 0xFF, key & 0xFF
    return key, None


def served(op: Op, dev: DeviceState) -> bool:
    return op.needs is None or op.needs(dev)


# ---- errors raised by the command handlers -------------------------------------------


def bad_cdb(byte: int, bit: int | None = None) -> SenseError:
    """INVALID FIELD IN CDB pointing at ``byte`` (and the field's most significant bit)."""
    return fail(Status.INVALID_CDB, field=(byte, bit, True))


def bad_param(byte: int, bit: int | None = None) -> SenseError:
    """INVALID FIELD IN PARAMETER LIST pointing at ``byte`` of the parameter data."""
    return fail(Status.INVALID_PARAM, field=(byte, bit, False))


def param_length_error(message: str = "") -> SenseError:
    """PARAMETER LIST LENGTH ERROR (SPC-4 Annex D 1Ah/00h)."""
    return fail(Status.PARAM_LIST_LENGTH, message=message)


def check_range(dev: DeviceState, lba: int, nblocks: int) -> None:
    """SBC-3 (every command's LBA check): LBA + count past the capacity is LOGICAL
    BLOCK ADDRESS OUT OF RANGE."""
    if lba + nblocks > dev.num_lbas:
        raise fail(Status.LBA_OUT_OF_RANGE)


def check_writable(dev: DeviceState) -> None:
    """SBC-3 write protection: a write-protected medium answers DATA PROTECT / WRITE PROTECTED."""
    if dev.caps.readonly:
        raise fail(Status.WRITE_PROTECTED)


def xfer_mismatch(byte: int | None) -> SenseError:
    """The data buffer is not the size the CDB implies: the transfer length field is
    inconsistent with what was actually sent, so point at it."""
    return fail(
        Status.INVALID_CDB,
        field=(byte, 7, True) if byte is not None else None,
        message="transfer length disagrees with the data buffer",
    )


def param_list(iov: Sequence[memoryview], data_len: int, declared: int) -> bytes:
    """The parameter list of a data-out command, ``declared`` bytes long.

    Fewer bytes than the CDB's PARAMETER LIST LENGTH is a PARAMETER LIST LENGTH ERROR;
    extra bytes are ignored (the CDB, not the buffer, says how much was meant).
    """
    if data_len < declared:
        raise fail(Status.PARAM_LIST_LENGTH, message="parameter list shorter than declared")
    data = b"".join(iov)
    if len(data) < declared:
        raise fail(Status.PARAM_LIST_LENGTH, message="parameter list shorter than declared")
    return data[:declared]


def data_in(data: bytes | bytearray, alloc_len: int) -> Result:
    """GOOD with ``data`` cut to the ALLOCATION LENGTH (SPC-4 ALLOCATION LENGTH field); never longer."""
    return Result(Sam.GOOD, data=bytes(data[:alloc_len]))


def first_difference(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> int:
    """Offset of the first byte where a and b differ (-1 if equal), found by halving."""
    ma, mb = memoryview(a).cast("B"), memoryview(b).cast("B")
    n = min(len(ma), len(mb))
    if ma[:n] == mb[:n]:
        return -1 if len(ma) == len(mb) else n
    lo, hi = 0, n  # the first difference is in [lo, hi)
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if ma[lo:mid] == mb[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if ma[i] != mb[i]:
            return i
    return hi  # unreachable: the slices differed


def chunk_bytes(block_size: int) -> int:
    """CHUNK rounded down to whole blocks (at least one block)."""
    return max(block_size, CHUNK // block_size * block_size)


def write_through(
    dev: DeviceState,
    offset: int,
    length: int,
    bufs: Sequence[memoryview | bytes | bytearray],
    fua: bool,
    target: DeviceState | None = None,
) -> Generator[Any, Any, None]:
    """Write inside a compound command, honouring FUA on the device written to: the
    engine only emulates FUA for a plain WRITE, so flush here when the handler has no
    native FUA (SBC-3 FUA bit: data must be on the medium before GOOD)."""
    yield Write(offset, length, bufs, fua, target)
    caps = (target or dev).caps
    if fua and not caps.fua and caps.flush:
        yield Flush(target)


def guarded(dev: DeviceState, gen: Generator[Any, Any, Result]) -> Compound:
    """Run a compound command so that a SenseError -- raised by its own checks or thrown
    in by the engine for a failed request -- ends it with the matching Result."""
    try:
        result = yield from gen
    except SenseError as err:
        return error_result(err, dev)
    return result if result is not None else GOOD
