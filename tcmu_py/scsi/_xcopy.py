"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS / OPERATING PARAMETERS (SPC-4 EXTENDED
COPY, RECEIVE COPY RESULTS; as tcmu-runner and LIO serve them, reference/tcmu.md §2.7).

The copy manager handles one block-to-block segment (descriptor 02h) between at most
two identification target descriptors (E4h) that name devices of this runner by their
NAA designator; data moves as Read requests on the source and Write requests on the
destination, chunk by chunk.
"""

from __future__ import annotations

import struct
from collections.abc import Generator, Sequence
from typing import Any

from ._common import (
    Op,
    bad_cdb,
    bad_param,
    chunk_bytes,
    data_in,
    guarded,
    param_length_error,
    param_list,
    sa_key,
    write_through,
)
from ._inquiry import naa_identifier
from ._model import GOOD, DeviceState, Outcome, Read, Result
from ._sense import Status, fail

# Copy manager limits, reported by RECEIVE COPY RESULTS / OPERATING PARAMETERS.
MAX_TARGET_DESCS = 2
MAX_SEGMENT_DESCS = 1
MAX_DESC_LIST_LEN = 1024
MAX_SEGMENT_LEN = 256 * 1024 * 1024
_GRANULARITY_LOG2 = 9
_SEG_BLOCK_TO_BLOCK = 0x02
_TGT_IDENTIFICATION = 0xE4

_HEADER = struct.Struct(">BBHxxxxII")  # list id, flags, CSCD list len, segment list len, inline
_SEGMENT = struct.Struct(">BBHHHxxHQQ")  # type, flags, desc len, src, dst, blocks, src lba, dst lba


def _target(dev: DeviceState, desc: bytes, at: int) -> DeviceState | None:
    """Resolve one identification target descriptor (SPC-4 CSCD descriptors) to a device;
    None means this device."""
    if desc[1] & 0xE0:
        raise bad_param(at + 1, 7)  # LU ID TYPE other than LUN, or a NUL device
    if desc[1] & 0x1F:
        raise fail(Status.COPY_TARGET_TYPE)  # only direct-access block devices
    if desc[4] & 0x0F != 0x01:
        raise bad_param(at + 4, 3)  # CODE SET: binary
    if desc[5] & 0x30:
        raise bad_param(at + 5, 5)  # ASSOCIATION: the logical unit
    if desc[5] & 0x0F != 0x03:
        raise bad_param(at + 5, 3)  # DESIGNATOR TYPE: NAA
    if desc[7] != 16 or desc[8] >> 4 != 0x6:
        raise bad_param(at + 7, 7)  # NAA IEEE Registered Extended, 16 bytes
    naa = bytes(desc[8:24])
    if dev.unit_serial and naa == naa_identifier(dev):
        return None
    other = dev.lookup_by_naa(naa) if dev.lookup_by_naa is not None else None
    if other is None:
        raise fail(Status.COPY_TARGET_UNREACHABLE)
    return None if other is dev else other


def _copy(
    dev: DeviceState,
    src: DeviceState | None,
    dst: DeviceState | None,
    src_lba: int,
    dst_lba: int,
    blocks: int,
) -> Generator[Any, Any, Result]:
    bs = dev.block_size if src is None else src.block_size
    step = chunk_bytes(bs)
    src_off, dst_off, left = src_lba * bs, dst_lba * bs, blocks * bs
    while left:
        length = min(step, left)
        data = yield Read(src_off, length, None, src)
        yield from write_through(dev, dst_off, length, [data], False, dst)
        src_off, dst_off, left = src_off + length, dst_off + length, left - length
    return GOOD


def extended_copy(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    """SPC-4 EXTENDED COPY (LID1)."""
    declared = int.from_bytes(cdb[10:14], "big")
    if declared == 0:  # "no data shall be transferred; not an error"
        return GOOD
    if declared < 16:
        raise param_length_error("EXTENDED COPY header truncated")
    data = param_list(iov, data_len, declared)
    list_id, flags, tdll, sdll, inline = _HEADER.unpack_from(data)
    usage = (flags >> 3) & 0x03  # LIST ID USAGE
    if usage == 0b01 or (usage == 0b11 and list_id):
        raise bad_param(1, 4)
    if tdll % 32:
        raise param_length_error("target descriptors are 32 bytes")
    if tdll // 32 > MAX_TARGET_DESCS:
        raise fail(Status.TOO_MANY_TARGET_DESCS)
    if tdll + sdll > MAX_DESC_LIST_LEN:
        raise param_length_error("descriptor lists exceed MAXIMUM DESCRIPTOR LIST LENGTH")
    if inline:
        raise bad_param(12, 7)  # no inline data is ever used
    if declared < 16 + tdll + sdll:
        raise param_length_error("descriptor lists longer than the parameter list")
    seg_at = 16 + tdll
    if sdll < 28:
        if sdll == 0:
            return GOOD  # nothing to copy
        raise param_length_error("segment descriptor truncated")
    if sdll > 28 * MAX_SEGMENT_DESCS:
        raise fail(Status.TOO_MANY_SEGMENT_DESCS)
    kind, _, seg_len, sidx, didx, blocks, src_lba, dst_lba = _SEGMENT.unpack_from(data, seg_at)
    if kind != _SEG_BLOCK_TO_BLOCK:
        raise fail(Status.UNSUPPORTED_SEGMENT_DESC)
    if seg_len != 0x18:
        raise bad_param(seg_at + 2, 7)
    ntargets = tdll // 32
    targets: list[DeviceState | None] = []
    for i in range(ntargets):
        at = 16 + 32 * i
        if data[at] != _TGT_IDENTIFICATION:
            raise fail(Status.UNSUPPORTED_TARGET_DESC)
        targets.append(_target(dev, data[at : at + 32], at))
    if sidx >= ntargets:
        raise bad_param(seg_at + 4, 7)
    if didx >= ntargets:
        raise bad_param(seg_at + 6, 7)
    src, dst = targets[sidx], targets[didx]
    s, d = src or dev, dst or dev
    if s.block_size != d.block_size:
        raise fail(Status.COPY_TARGET_TYPE)
    if src_lba + blocks > s.num_lbas or dst_lba + blocks > d.num_lbas:
        raise fail(Status.LBA_OUT_OF_RANGE)
    if d.caps.readonly:
        raise fail(Status.WRITE_PROTECTED)
    if not blocks:
        return GOOD
    return guarded(dev, _copy(dev, src, dst, src_lba, dst_lba, blocks))


def _operating_parameters() -> bytes:
    """SPC-4 RECEIVE COPY RESULTS, OPERATING PARAMETERS service action."""
    buf = bytearray(46)
    buf[0:4] = (len(buf) - 4).to_bytes(4, "big")  # AVAILABLE DATA
    buf[4] = 0x01  # SNLID: LIST ID USAGE 11b is supported
    buf[8:10] = MAX_TARGET_DESCS.to_bytes(2, "big")
    buf[10:12] = MAX_SEGMENT_DESCS.to_bytes(2, "big")
    buf[12:16] = MAX_DESC_LIST_LEN.to_bytes(4, "big")
    buf[16:20] = MAX_SEGMENT_LEN.to_bytes(4, "big")
    buf[34:36] = (1).to_bytes(2, "big")  # TOTAL CONCURRENT COPIES
    buf[36] = 1  # MAXIMUM CONCURRENT COPIES
    buf[37] = buf[38] = buf[39] = _GRANULARITY_LOG2  # data segment, inline, held data
    buf[43] = 2  # IMPLEMENTED DESCRIPTOR LIST LENGTH
    buf[44] = _SEG_BLOCK_TO_BLOCK
    buf[45] = _TGT_IDENTIFICATION
    return bytes(buf)


def receive_copy_results(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    """SPC-4 RECEIVE COPY RESULTS: only OPERATING PARAMETERS (the dispatcher refuses other service
    actions); the LIST IDENTIFIER does not apply to it."""
    if cdb[1] & 0x1F != 0x03:
        raise bad_cdb(1, 4)
    return data_in(_operating_parameters(), int.from_bytes(cdb[10:14], "big"))


OPS: dict[int, Op] = {
    sa_key(0x83, 0x00): Op(
        extended_copy,
        "EXTENDED COPY (LID1)",
        16,
        b"\x83\x1f" + bytes(8) + b"\xff" * 4 + b"\0\0",
    ),
    sa_key(0x84, 0x03): Op(
        receive_copy_results,
        "RECEIVE COPY RESULTS / OPERATING PARAMETERS",
        16,
        b"\x84\x1f" + bytes(8) + b"\xff" * 4 + b"\0\0",
    ),
}
