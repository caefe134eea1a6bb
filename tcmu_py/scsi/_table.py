"""The literal opcode table: every command this layer serves, one entry each.

Each family module holds its slice as a dict literal (``OPS``); this module joins them
and refuses duplicates.  Dispatch, REPORT SUPPORTED OPERATION CODES and INQUIRY's 3PC
bit all read this one table, so they cannot disagree.  Keys are the opcode, or
``sa_key(opcode, service_action)`` for the service-action commands.
"""

from __future__ import annotations

from . import (
    _alua,
    _capacity,
    _caw,
    _format,
    _inquiry,
    _mode,
    _provisioning,
    _rsoc,
    _rw,
    _unit,
    _verify,
    _xcopy,
)
from ._common import Op, served, split_key
from ._model import DeviceState

_FAMILIES: tuple[dict[int, Op], ...] = (
    _unit.OPS,  # TEST UNIT READY, REQUEST SENSE, START STOP UNIT
    _inquiry.OPS,  # INQUIRY and its VPD pages
    _capacity.OPS,  # READ CAPACITY (10)/(16)
    _mode.OPS,  # MODE SENSE/SELECT (6)/(10)
    _rw.OPS,  # READ/WRITE (6)/(10)/(12)/(16), SYNCHRONIZE CACHE
    _verify.OPS,  # VERIFY, WRITE AND VERIFY
    _provisioning.OPS,  # WRITE SAME, UNMAP, GET LBA STATUS
    _caw.OPS,  # COMPARE AND WRITE
    _xcopy.OPS,  # EXTENDED COPY, RECEIVE COPY RESULTS
    _format.OPS,  # FORMAT UNIT
    _alua.OPS,  # REPORT/SET TARGET PORT GROUPS
    _rsoc.OPS,  # REPORT SUPPORTED OPERATION CODES
)


def _join(families: tuple[dict[int, Op], ...]) -> dict[int, Op]:
    table: dict[int, Op] = {}
    for family in families:
        for key, op in family.items():
            if key in table:
                raise RuntimeError(f"opcode table: {op.name} and {table[key].name} share a key")
            if len(op.usage) != op.cdb_len or op.usage[0] != split_key(key)[0]:
                raise RuntimeError(f"opcode table: {op.name} has a malformed CDB usage map")
            table[key] = op
    return table


TABLE: dict[int, Op] = _join(_FAMILIES)


def is_served(key: int, dev: DeviceState) -> bool:
    """Whether this device serves the command with table key ``key``."""
    op = TABLE.get(key)
    return op is not None and served(op, dev)
