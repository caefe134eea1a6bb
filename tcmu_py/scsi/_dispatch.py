"""dispatch(): one CDB in, one Result / I/O request / compound generator out.

Before the table lookup come two gates, each a single truthiness test on the hot path:
a pending unit attention (SAM-5 unit attention condition) and a running FORMAT UNIT
(SBC-3 FORMAT UNIT), both skipped for INQUIRY, REQUEST SENSE and REPORT LUNS.
Commands the device does not serve answer INVALID COMMAND OPERATION CODE -- or
INVALID FIELD IN CDB for an unserved service action of a served opcode -- and are
logged once per opcode per device, never per command (tcmu-runner's log spam,
reference/tcmu.md §3 #7).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ._common import SA_OPCODES, Op, bad_cdb, sa_key, served, split_key
from ._model import DeviceState, Outcome, Result, SenseError, SenseKey
from ._sense import Status, error_result, fail
from ._table import TABLE

log = logging.getLogger("tcmu_py.scsi")

# SAM-5 unit attention condition / SBC-3 FORMAT UNIT: these are answered even with a
# unit attention pending or a format in progress (REQUEST SENSE reports both).
_HOLD_EXEMPT = frozenset({0x03, 0x12, 0xA0})

_lookup = TABLE.get

# opcode -> the entries of its service actions (for "served opcode, unserved SA")
_SA_FAMILY: dict[int, tuple[Op, ...]] = {
    opcode: tuple(op for key, op in TABLE.items() if split_key(key)[0] == opcode)
    for opcode in SA_OPCODES
}


def dispatch(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """Decode ``cdb`` for ``dev``; never raises for any CDB or data (see ``_model``)."""
    if dev.pending_ua or dev.format_progress is not None:
        held = _held(cdb, dev)
        if held is not None:
            return held
    try:
        op = _lookup(cdb[0])
    except IndexError:
        return _unsupported(dev, -1, "an empty CDB")
    if op is None or (op.needs is not None and not op.needs(dev)):
        return _other(cdb, iov, data_len, dev)
    if len(cdb) < op.cdb_len:
        return _short(dev, op)
    try:
        return op.fn(cdb, iov, data_len, dev)
    except SenseError as err:
        return error_result(err, dev)


def _held(cdb: bytes, dev: DeviceState) -> Result | None:
    """The unit-attention / format-in-progress answer, or None to go on."""
    if cdb and cdb[0] in _HOLD_EXEMPT:
        return None
    if dev.pending_ua:
        asc, ascq = dev.pending_ua.popleft()  # reported with CHECK CONDITION: cleared
        return error_result(SenseError(SenseKey.UNIT_ATTENTION, asc, ascq), dev)
    if dev.format_progress is not None:
        err = fail(Status.FORMAT_IN_PROGRESS)
        err.progress = dev.format_progress
        return error_result(err, dev)
    return None


def _short(dev: DeviceState, op: Op) -> Result:
    """A CDB shorter than its operation code defines: the operation code is what
    implies the length, so the field pointer names byte 0."""
    err = fail(Status.INVALID_CDB, field=(0, 7, True), message=f"{op.name}: CDB too short")
    return error_result(err, dev)


def _other(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """Service-action commands, and everything this device does not serve."""
    opcode = cdb[0]
    if opcode in SA_OPCODES:
        if len(cdb) < 2:
            return _unsupported(dev, opcode, f"a truncated CDB for opcode {opcode:#04x}")
        sa = cdb[1] & 0x1F
        op = _lookup(sa_key(opcode, sa))
        if op is not None and served(op, dev):
            if len(cdb) < op.cdb_len:
                return _short(dev, op)
            try:
                return op.fn(cdb, iov, data_len, dev)
            except SenseError as err:
                return error_result(err, dev)
        if any(served(o, dev) for o in _SA_FAMILY[opcode]):
            # SPC-4 (reserved CDB values): a reserved value in a field other than the operation code
            _log_once(dev, sa_key(opcode, sa), f"opcode {opcode:#04x} service action {sa:#04x}")
            return error_result(bad_cdb(1, 4), dev)
    op = _lookup(opcode)
    what = op.name if op is not None else f"opcode {opcode:#04x}"
    return _unsupported(dev, opcode, what)


def _unsupported(dev: DeviceState, key: int, what: str) -> Result:
    _log_once(dev, key, what)
    return error_result(fail(Status.INVALID_OPCODE), dev)


def _log_once(dev: DeviceState, key: int, what: str) -> None:
    if key not in dev.logged_opcodes:
        dev.logged_opcodes.add(key)
        log.info(
            "%s: %s is not served by this device; answering ILLEGAL REQUEST (logged once)",
            dev.name,
            what,
        )
