"""Asymmetric logical unit access: REPORT TARGET PORT GROUPS and SET TARGET PORT GROUPS
(SPC-4 asymmetric logical unit access, REPORT and SET TARGET PORT GROUPS; reference/tcmu.md §2.8).

The groups come from the control plane (``DeviceState.alua_groups``, read from configfs).
SET TARGET PORT GROUPS is served only with explicit ALUA; it records the new states in
those groups for the control plane to apply.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._common import Op, bad_cdb, bad_param, data_in, param_list, sa_key
from ._model import GOOD, AluaGroup, DeviceState, Outcome

# ASYMMETRIC ACCESS STATE -> its bit in the supported-states byte of RTPG (SPC-4 REPORT TARGET PORT GROUPS).
_SUPPORT_BIT = {0x0: 0x01, 0x1: 0x02, 0x2: 0x04, 0x3: 0x08, 0xE: 0x40, 0xF: 0x80}
_SETTABLE = frozenset({0x0, 0x1, 0x2, 0x3, 0xE})  # SPC-4 SET TARGET PORT GROUPS: not Transitioning


def _explicit(dev: DeviceState) -> bool:
    return dev.alua_explicit


def _descriptor(group: AluaGroup) -> bytes:
    """A target port group descriptor (SPC-4 REPORT TARGET PORT GROUPS parameter data)."""
    ports = group.rel_port_ids[:255]
    out = bytearray(8)
    out[0] = (0x80 if group.preferred else 0) | (group.state & 0x0F)  # PREF, state
    out[1] = group.supported & 0xFF  # T_SUP O_SUP LBD_SUP U_SUP S_SUP AN_SUP AO_SUP
    out[2:4] = (group.group_id & 0xFFFF).to_bytes(2, "big")
    out[5] = group.status & 0xFF
    out[7] = len(ports)  # TARGET PORT COUNT
    for rel in ports:
        out += b"\0\0" + (rel & 0xFFFF).to_bytes(2, "big")
    return bytes(out)


def report_target_port_groups(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    """SPC-4 REPORT TARGET PORT GROUPS: PARAMETER DATA FORMAT 000b (length-only header) or 001b (extended)."""
    fmt = cdb[1] >> 5
    if fmt not in (0b000, 0b001):
        raise bad_cdb(1, 7)
    alloc = int.from_bytes(cdb[6:10], "big")
    body = b"".join(_descriptor(g) for g in dev.alua_groups)
    if fmt == 0b001:  # FORMAT TYPE 001b, IMPLICIT TRANSITION TIME not reported
        data = (len(body) + 4).to_bytes(4, "big") + bytes((0x10, 0, 0, 0)) + body
    else:
        data = len(body).to_bytes(4, "big") + body
    return data_in(data, alloc)


def set_target_port_groups(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    """SPC-4 SET TARGET PORT GROUPS: all descriptors are validated before any state changes."""
    declared = int.from_bytes(cdb[6:10], "big")
    if declared == 0:
        return GOOD
    data = param_list(iov, data_len, declared)
    groups = {g.group_id: g for g in dev.alua_groups}
    changes: list[tuple[AluaGroup, int]] = []
    for at in range(4, declared - 3, 4):  # 4 reserved bytes, then 4-byte descriptors
        state = data[at] & 0x0F
        gid = int.from_bytes(data[at + 2 : at + 4], "big")
        group = groups.get(gid)
        if group is None:
            raise bad_param(at + 2, 7)
        if state not in _SETTABLE or not group.supported & _SUPPORT_BIT[state]:
            raise bad_param(at, 3)
        changes.append((group, state))
    for group, state in changes:
        group.state = state
    return GOOD


OPS: dict[int, Op] = {
    sa_key(0xA3, 0x0A): Op(
        report_target_port_groups,
        "REPORT TARGET PORT GROUPS",
        12,
        bytes((0xA3, 0xFF, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
    ),
    sa_key(0xA4, 0x0A): Op(
        set_target_port_groups,
        "SET TARGET PORT GROUPS",
        12,
        bytes((0xA4, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0)),
        _explicit,
    ),
}
