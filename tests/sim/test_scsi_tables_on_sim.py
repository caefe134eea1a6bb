"""The SCSI layer's standards tables, run again end to end: simulated kernel, ring,
engine and the ram handler instead of the in-memory executor.

Every row whose device is the default one is replayed; rows that configure handler
capabilities the ram handler does not have (or other device state) stay in the pure
tier only.  A row answered differently here than in the pure tier is a bug in the
ring, the engine or the handler.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scsi_exec import Case, Response, decode_sense

from tcmu_py.abi import scsi_command_size
from tcmu_py.scsi import Sam
from tcmu_py.sim import SimTarget
from tcmu_py_handlers.ram import RamHandler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_scsi_sbc import SBC_CASES
from test_scsi_spc import SPC_CASES

SERIAL = "0123456789abcdef0123456789abcdef"  # scsi_exec.MemDevice's default
# rows whose expectation depends on GET LBA STATUS support, which ram does not offer
_CAPS_DEPENDENT = ("GET LBA STATUS", "get lba status", "0x34", "RSOC")


def _replayable(c: Case) -> bool:
    if set(c.dev) - {"num_lbas", "block_size"}:
        return False
    # the kernel always delivers a whole CDB: truncated ones exist only in the pure tier
    if not c.cdb or len(c.cdb) < scsi_command_size(c.cdb[0], c.cdb[7] if len(c.cdb) > 7 else 0):
        return False
    # the ram handler really allocates (sparsely): no multi-terabyte devices here
    if c.dev.get("num_lbas", 128) * c.dev.get("block_size", 512) > 1 << 30:
        return False
    text = f"{c.name} {c.clause}"
    return not any(k in text for k in _CAPS_DEPENDENT)


CASES = [c for c in (*SPC_CASES, *SBC_CASES) if _replayable(c)]


@pytest.fixture(scope="module")
def targets():
    made: dict[tuple[int, int], SimTarget] = {}
    yield made
    for t in made.values():
        t.close()


def _target(targets, num_lbas: int, block_size: int) -> SimTarget:
    # a fresh device per row, like the pure tier: rows may write, resize or set UAs
    key = (num_lbas, block_size)
    old = targets.pop(key, None)
    if old is not None:
        old.close()
    t = SimTarget(RamHandler, "ram/", size=num_lbas * block_size, block_size=block_size,
                  unit_serial=SERIAL, data_size=8 * 1024 * 1024, cmdr_size=64 * 1024)
    targets[key] = t
    return t


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_table_row_through_the_simulated_kernel(case: Case, targets) -> None:
    t = _target(targets, case.dev.get("num_lbas", 128), case.dev.get("block_size", 512))
    r = t.submit(case.cdb, case.data_out or None, case.alloc)
    res = Response(r.status, r.sense, r.data)
    assert res.status == case.status, (case.name, res)
    if case.sense is not None:
        s = decode_sense(res.sense)
        assert (s.key, s.asc, s.ascq) == case.sense, (case.name, s)
        if case.field is not None:
            assert s.field == case.field, (case.name, s.field)
    if res.status == Sam.GOOD and callable(case.data):
        assert case.data(res.data), (case.name, res.data)
    elif res.status == Sam.GOOD and case.data is not None:
        assert res.data == case.data, (case.name, res.data)


def test_most_rows_are_replayed() -> None:
    assert len(CASES) >= 0.6 * (len(SPC_CASES) + len(SBC_CASES))
