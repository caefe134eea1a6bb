"""Any CDB with any data gets a well-formed answer and never an exception; and REPORT
SUPPORTED OPERATION CODES never disagrees with what dispatch serves."""

from __future__ import annotations

import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scsi_exec import MemDevice, decode_sense, execute, maint_in

from tcmu_py.scsi import TABLE, AluaGroup, Caps, Flush, Read, Result, Sam, Write, dispatch
from tcmu_py.scsi._common import split_key

_STATUSES = {int(s) for s in Sam}
_TABLE_OPCODES = sorted({split_key(k)[0] for k in TABLE})
_SAS = sorted({sa for k in TABLE if (sa := split_key(k)[1]) is not None})

caps_st = st.builds(
    Caps,
    flush=st.booleans(),
    unmap=st.booleans(),
    write_same=st.booleans(),
    caw=st.booleans(),
    lbprz=st.booleans(),
    get_lba_status=st.booleans(),
    fua=st.booleans(),
    readonly=st.booleans(),
)


@st.composite
def cdbs(draw: st.DrawFn) -> bytes:
    opcode = draw(st.one_of(st.sampled_from(_TABLE_OPCODES), st.integers(0, 255)))
    length = draw(st.sampled_from([6, 10, 12, 16]))
    rest = bytearray(draw(st.binary(min_size=length - 1, max_size=length - 1)))
    if draw(st.booleans()):
        rest[0] = draw(st.sampled_from(_SAS)) | (rest[0] & 0xE0)
    if draw(st.booleans()):  # small numbers make for commands that get further
        for i in range(1, len(rest)):
            rest[i] = draw(st.sampled_from([0, 0, 1, 2, 8, rest[i]]))
    return bytes((opcode,)) + bytes(rest)


def _device(draw_caps: Caps, num_lbas: int, bs: int, explicit: bool) -> MemDevice:
    dev = MemDevice.make(
        num_lbas,
        bs,
        draw_caps,
        alua_groups=[AluaGroup(1, 0), AluaGroup(2, 1, rel_port_ids=(1, 2))],
        alua_explicit=explicit,
        max_write_same_lbas=4096,
    )
    return dev


def _well_formed(status: int, sense: bytes) -> None:
    assert status in _STATUSES
    if status == Sam.CHECK_CONDITION:
        assert sense[0] & 0x7F in (0x70, 0x71, 0x72, 0x73)
        if sense[0] & 0x7F in (0x70, 0x71):
            assert len(sense) >= 18
        else:
            assert len(sense) >= 8 and len(sense) == 8 + sense[7]
        decode_sense(sense)
    else:
        assert sense == b""


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cdb=cdbs(),
    data=st.one_of(st.just(b""), st.binary(max_size=2048)),
    alloc=st.integers(0, 4096),
    caps=caps_st,
    num_lbas=st.integers(1, 256),
    bs=st.sampled_from([512, 4096]),
    explicit=st.booleans(),
)
def test_any_cdb_gets_a_well_formed_answer(cdb, data, alloc, caps, num_lbas, bs, explicit):
    dev = _device(caps, num_lbas, bs, explicit)
    buf = bytearray(data or bytes(alloc))
    out = dispatch(cdb, [memoryview(buf)], len(buf), dev.state)
    assert isinstance(out, (Result, Read, Write, Flush, types.GeneratorType))
    res = execute(dev, cdb, data, alloc)
    _well_formed(res.status, res.sense)
    if not data:
        assert len(res.data) <= alloc
    dev.run_background()
    for r in dev.background_results:
        _well_formed(r.status, r.sense)
    assert dev.state.format_progress is None


@settings(max_examples=150, deadline=None)
@given(
    cmds=st.lists(st.tuples(cdbs(), st.binary(max_size=600), st.integers(0, 600)), max_size=6),
    caps=caps_st,
)
def test_any_command_sequence_stays_well_formed(cmds, caps):
    dev = _device(caps, 64, 512, True)
    for cdb, data, alloc in cmds:
        res = execute(dev, cdb, data, alloc)
        _well_formed(res.status, res.sense)
        dev.run_background(steps=1)


def _probe(op_key: int, cdb_len: int) -> bytes:
    opcode, sa = split_key(op_key)
    cdb = bytearray(cdb_len)
    cdb[0] = opcode
    if sa is not None:
        cdb[1] = sa
    return bytes(cdb)


def _rsoc_one(dev: MemDevice, key: int) -> int:
    opcode, sa = split_key(key)
    opts = 0x02 if sa is not None else 0x01
    res = execute(dev, maint_in(0x0C, 64, b2=opts, b3=opcode, b45=sa or 0), alloc_len=64)
    assert res.status == 0
    return res.data[1] & 0x07


@pytest.mark.parametrize("caps", [Caps(), Caps(flush=True, unmap=True, get_lba_status=True)])
@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("key", sorted(TABLE), ids=lambda k: TABLE[k].name)
def test_rsoc_agrees_with_dispatch(key, caps, explicit):
    """A command RSOC reports as supported is never refused as unsupported by dispatch,
    and one it reports as not supported always is."""
    dev = _device(caps, 64, 512, explicit)
    support = _rsoc_one(dev, key)
    res = execute(dev, _probe(key, TABLE[key].cdb_len), b"", 0)
    refused = res.status == Sam.CHECK_CONDITION and (
        decode_sense(res.sense).asc == 0x20
        or (split_key(key)[1] is not None and decode_sense(res.sense).field == (1, 4, True))
    )
    assert support in (0b001, 0b011)
    assert refused == (support == 0b001), (TABLE[key].name, res)


def test_table_entries_are_consistent():
    for key, op in TABLE.items():
        assert len(op.usage) == op.cdb_len
        assert op.usage[0] == split_key(key)[0]
        assert op.cdb_len in (6, 10, 12, 16)
