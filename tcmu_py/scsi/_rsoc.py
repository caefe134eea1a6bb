"""REPORT SUPPORTED OPERATION CODES (SPC-4), generated from the opcode table.

It reads the very table dispatch serves from, filtered by the same ``served`` test, so
the report cannot disagree with what the device does (tcmu-runner lacked the command
and logged every ESXi/Windows probe, reference/tcmu.md §3 #7).
"""

from __future__ import annotations

from collections.abc import Sequence

from ._common import SA_OPCODES, Op, bad_cdb, data_in, sa_key, served, split_key
from ._model import DeviceState, Outcome

# SUPPORT field values of the one_command format (SPC-4 Table 171).
_NOT_SUPPORTED = 0b001
_SUPPORTED = 0b011
# Command timeouts descriptor (SPC-4 RSOC): length 0Ah, no timeouts specified.
_TIMEOUTS = b"\x00\x0a" + bytes(10)


def _table() -> dict[int, Op]:
    from . import _table  # the table includes this module's entry: import on first use

    return _table.TABLE


def _all_commands(dev: DeviceState, rctd: bool) -> bytes:
    out = bytearray()
    for key, op in sorted(_table().items()):
        if not served(op, dev):
            continue
        opcode, sa = split_key(key)
        out += bytes((opcode, 0)) + (sa or 0).to_bytes(2, "big")
        out += bytes((0, (0x02 if rctd else 0) | (0x01 if sa is not None else 0)))
        out += op.cdb_len.to_bytes(2, "big")
        if rctd:
            out += _TIMEOUTS
    return len(out).to_bytes(4, "big") + out


def _one_command(op: Op | None, dev: DeviceState, rctd: bool) -> bytes:
    ctdp = 0x80 if rctd else 0
    if op is None or not served(op, dev):
        return bytes((0, ctdp | _NOT_SUPPORTED, 0, 0))
    out = bytes((0, ctdp | _SUPPORTED)) + op.cdb_len.to_bytes(2, "big") + op.usage
    return out + (_TIMEOUTS if rctd else b"")


def report_supported_operation_codes(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    rctd = bool(cdb[2] & 0x80)
    options = cdb[2] & 0x07
    opcode = cdb[3]
    sa = int.from_bytes(cdb[4:6], "big")
    alloc = int.from_bytes(cdb[6:10], "big")
    table = _table()
    if options == 0b000:
        return data_in(_all_commands(dev, rctd), alloc)
    has_sa = opcode in SA_OPCODES
    if options == 0b001:  # by operation code: not for one that has service actions
        if has_sa:
            raise bad_cdb(3, 7)
        op = table.get(opcode)
    elif options == 0b010:  # by operation code and service action: only for those
        if not has_sa:
            raise bad_cdb(3, 7)
        op = table.get(sa_key(opcode, sa)) if sa <= 0x1F else None
    elif options == 0b011:  # either kind; a plain opcode matches service action 0 only
        if has_sa:
            op = table.get(sa_key(opcode, sa)) if sa <= 0x1F else None
        else:
            op = table.get(opcode) if sa == 0 else None
    else:
        raise bad_cdb(2, 2)  # reserved REPORTING OPTIONS
    return data_in(_one_command(op, dev, rctd), alloc)


OPS: dict[int, Op] = {
    sa_key(0xA3, 0x0C): Op(
        report_supported_operation_codes,
        "REPORT SUPPORTED OPERATION CODES",
        12,
        bytes((0xA3, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
    ),
}
