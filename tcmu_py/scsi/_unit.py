"""Logical-unit state commands: TEST UNIT READY, REQUEST SENSE, START STOP UNIT.

REQUEST SENSE is where an initiator collects what is pending without a CHECK CONDITION:
the next unit attention (then cleared), FORMAT UNIT's progress, or a deferred error
(SPC-4 REQUEST SENSE; tcmu-runner never served it, reference/tcmu.md §2.7).
"""

from __future__ import annotations

from collections.abc import Sequence

from ._common import Op, bad_cdb, data_in
from ._model import GOOD, DeviceState, Outcome, SenseKey
from ._sense import build_sense


def test_unit_ready(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SPC-4 TEST UNIT READY: GOOD once past the unit-attention and format gates of dispatch."""
    return GOOD


def request_sense(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SPC-4 REQUEST SENSE: GOOD status with the sense data describing the logical unit."""
    descriptor = bool(cdb[1] & 0x01)  # DESC
    alloc = cdb[4]
    if dev.pending_ua:
        asc, ascq = dev.pending_ua.popleft()  # reported, therefore cleared (SAM-5)
        sense = build_sense(SenseKey.UNIT_ATTENTION, asc, ascq, descriptor=descriptor)
    elif dev.format_progress is not None:  # SBC-3 FORMAT UNIT: NOT READY with progress
        sense = build_sense(
            SenseKey.NOT_READY, 0x04, 0x04, progress=dev.format_progress, descriptor=descriptor
        )
    elif dev.last_sense:
        sense, dev.last_sense = dev.last_sense, b""
    else:
        sense = build_sense(SenseKey.NO_SENSE, 0x00, 0x00, descriptor=descriptor)
    return data_in(sense, alloc)


def start_stop_unit(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SBC-3 START STOP UNIT.  The medium is always spinning: START=1 is GOOD; stopping, ejecting
    and power conditions are refused (as tcmu-runner does) since nothing would then make
    the media-access commands answer NOT READY as SBC requires."""
    if cdb[3] & 0x0F:
        raise bad_cdb(3, 3)  # POWER CONDITION MODIFIER
    if cdb[4] & 0xF0:
        raise bad_cdb(4, 7)  # POWER CONDITION
    if not cdb[4] & 0x01:
        raise bad_cdb(4, 0)  # START=0: stop (or eject, with LOEJ)
    return GOOD


OPS: dict[int, Op] = {
    0x00: Op(test_unit_ready, "TEST UNIT READY", 6, bytes((0x00, 0, 0, 0, 0, 0))),
    0x03: Op(request_sense, "REQUEST SENSE", 6, bytes((0x03, 0x01, 0, 0, 0xFF, 0))),
    0x1B: Op(start_stop_unit, "START STOP UNIT", 6, bytes((0x1B, 0, 0, 0x0F, 0xF1, 0))),
}
