"""Sense data and the one status -> sense table, checked against SPC-4 "Sense data"
(descriptor and fixed formats), SPC-4 Annex D (ASC/ASCQ assignments) and SBC-3 (thin provisioning)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scsi_exec import decode_sense

from tcmu_py.scsi import (
    STATUS_SENSE,
    DeviceState,
    Sam,
    SenseError,
    SenseKey,
    Status,
    add_unit_attention,
    build_sense,
    check_condition,
    errno_to_sense,
    sense_for,
)


def test_fixed_format_layout():
    """SPC-4 fixed format sense data: 70h, sense key in byte 2, ADDITIONAL SENSE LENGTH
    0Ah, ASC/ASCQ in bytes 12-13."""
    s = build_sense(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
    assert s == bytes((0x70, 0, 0x05, 0, 0, 0, 0, 0x0A, 0, 0, 0, 0, 0x21, 0, 0, 0, 0, 0))


def test_fixed_format_information_field():
    """SPC-4 fixed format sense data: VALID=1 and the INFORMATION field in bytes 3-6."""
    s = build_sense(SenseKey.MISCOMPARE, 0x1D, 0x00, info=0x01020304)
    assert s[0] == 0xF0 and s[3:7] == b"\x01\x02\x03\x04" and s[2] == 0x0E


def test_fixed_format_field_pointer():
    """SPC-4 field pointer sense-key specific data: SKSV, C/D, BPV, BIT POINTER and
    FIELD POINTER in bytes 15-17."""
    s = build_sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, field=(13, 7, True))
    assert s[15:18] == bytes((0x80 | 0x40 | 0x08 | 7, 0, 13))
    s = build_sense(SenseKey.ILLEGAL_REQUEST, 0x26, 0x00, field=(300, None, False))
    assert s[15:18] == bytes((0x80, 0x01, 0x2C))


def test_fixed_format_progress_indication():
    """SPC-4 progress indication sense-key specific data: SKSV and PROGRESS INDICATION for NOT READY."""
    s = build_sense(SenseKey.NOT_READY, 0x04, 0x04, progress=0x8000)
    assert s[2] == 0x02 and s[12:14] == b"\x04\x04" and s[15:18] == b"\x80\x80\x00"


def test_descriptor_format_layout():
    """SPC-4 descriptor format sense data: 72h, key, ASC, ASCQ, ADDITIONAL SENSE LENGTH;
    information descriptor (00h, length 0Ah, VALID) and sense key specific descriptor
    (02h, length 06h)."""
    s = build_sense(
        SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, info=7, field=(1, 4, True), descriptor=True
    )
    assert s[:8] == bytes((0x72, 0x05, 0x24, 0x00, 0, 0, 0, 20))
    assert s[8:20] == bytes((0x00, 0x0A, 0x80, 0)) + (7).to_bytes(8, "big")
    assert s[20:28] == bytes((0x02, 0x06, 0, 0, 0xC0 | 0x08 | 4, 0, 1, 0))


def test_deferred_error_response_codes():
    """SPC-4 sense data response codes: 71h / 73h for deferred errors."""
    assert build_sense(3, 0x31, 1, deferred=True)[0] == 0x71
    assert build_sense(3, 0x31, 1, deferred=True, descriptor=True)[0] == 0x73


@given(
    key=st.integers(0, 15),
    asc=st.integers(0, 255),
    ascq=st.integers(0, 255),
    info=st.none() | st.integers(0, 2**32 - 1),
    descriptor=st.booleans(),
)
def test_sense_round_trips(key, asc, ascq, info, descriptor):
    s = decode_sense(build_sense(key, asc, ascq, info=info, descriptor=descriptor))
    assert (s.key, s.asc, s.ascq, s.info) == (key, asc, ascq, info)


# SPC-4 Annex D / SBC-3 assignments, one row per status.
EXPECTED = {
    Status.BUSY: (Sam.BUSY, None),
    Status.TASK_SET_FULL: (Sam.TASK_SET_FULL, None),
    Status.FORMAT_IN_PROGRESS: (Sam.CHECK_CONDITION, (2, 0x04, 0x04)),
    Status.TRANSITIONING: (Sam.CHECK_CONDITION, (2, 0x04, 0x0A)),
    Status.FENCED: (Sam.CHECK_CONDITION, (2, 0x04, 0x0B)),
    Status.READ_ERROR: (Sam.CHECK_CONDITION, (3, 0x11, 0x00)),
    Status.WRITE_ERROR: (Sam.CHECK_CONDITION, (3, 0x0C, 0x00)),
    Status.PARAM_LIST_LENGTH: (Sam.CHECK_CONDITION, (5, 0x1A, 0x00)),
    Status.MISCOMPARE: (Sam.CHECK_CONDITION, (0x0E, 0x1D, 0x00)),
    Status.INVALID_OPCODE: (Sam.CHECK_CONDITION, (5, 0x20, 0x00)),
    Status.LBA_OUT_OF_RANGE: (Sam.CHECK_CONDITION, (5, 0x21, 0x00)),
    Status.INVALID_CDB: (Sam.CHECK_CONDITION, (5, 0x24, 0x00)),
    Status.INVALID_PARAM: (Sam.CHECK_CONDITION, (5, 0x26, 0x00)),
    Status.WRITE_PROTECTED: (Sam.CHECK_CONDITION, (7, 0x27, 0x00)),
    Status.SPACE_EXHAUSTED: (Sam.CHECK_CONDITION, (7, 0x27, 0x07)),
    Status.SAVING_NOT_SUPPORTED: (Sam.CHECK_CONDITION, (5, 0x39, 0x00)),
    Status.HARDWARE_ERROR: (Sam.CHECK_CONDITION, (4, 0x44, 0x00)),
    Status.RESET_OCCURRED: (Sam.CHECK_CONDITION, (6, 0x29, 0x00)),
    Status.CAPACITY_CHANGED: (Sam.CHECK_CONDITION, (6, 0x2A, 0x09)),
    Status.COPY_TARGET_UNREACHABLE: (Sam.CHECK_CONDITION, (0x0A, 0x0D, 0x02)),
}


@pytest.mark.parametrize("status", list(EXPECTED), ids=lambda s: s.name)
def test_status_sense_table(status):
    sam, sense = EXPECTED[status]
    got = STATUS_SENSE[status]
    assert got[0] == sam
    if sense is not None:
        assert got[1:] == sense


def test_every_status_has_a_row():
    assert set(STATUS_SENSE) == set(Status)


@pytest.mark.parametrize(
    ("err", "write", "status", "sense"),
    [
        (errno.EIO, False, Sam.CHECK_CONDITION, (3, 0x11, 0x00)),
        (errno.EIO, True, Sam.CHECK_CONDITION, (3, 0x0C, 0x00)),
        (errno.ENOSPC, True, Sam.CHECK_CONDITION, (7, 0x27, 0x07)),
        (errno.EROFS, True, Sam.CHECK_CONDITION, (7, 0x27, 0x00)),
        (errno.ESHUTDOWN, False, Sam.CHECK_CONDITION, (2, 0x04, 0x0B)),
        (errno.ETIMEDOUT, False, Sam.BUSY, None),
        (errno.EBUSY, False, Sam.BUSY, None),
        (errno.EAGAIN, False, Sam.BUSY, None),
        (errno.ENOMEM, False, Sam.TASK_SET_FULL, None),
        (errno.EINVAL, False, Sam.CHECK_CONDITION, (4, 0x44, 0x00)),
        (errno.EPERM, True, Sam.CHECK_CONDITION, (4, 0x44, 0x00)),
    ],
)
def test_errno_at_the_handler_boundary(err, write, status, sense):
    e = errno_to_sense(err, write=write)
    assert isinstance(e, SenseError) and e.status == status
    if sense is not None:
        assert (e.key, e.asc, e.ascq) == sense


def test_check_condition_builds_a_result():
    r = check_condition(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, field=(2, 7, True))
    assert r.status == Sam.CHECK_CONDITION
    s = decode_sense(r.sense)
    assert (s.key, s.asc, s.field) == (5, 0x24, (2, 7, True))


def test_sense_for_a_handler_error():
    err = SenseError(SenseKey.MISCOMPARE, 0x1D, 0x00, info=42)
    assert decode_sense(sense_for(err)).info == 42
    assert sense_for(err, descriptor=True)[0] == 0x72


def test_the_same_unit_attention_is_queued_once():
    dev = DeviceState("d", "ram/d", 512, 8)
    add_unit_attention(dev, 0x2A, 0x09)
    add_unit_attention(dev, 0x2A, 0x09)
    assert list(dev.pending_ua) == [(0x2A, 0x09)]


def test_naa_follows_lio_for_a_uuid_serial():
    """LIO (spc_gen_naa_6h_vendor_specific): 6h, OUI 001405h, then the serial's hex
    digits, skipping anything else -- the 36001405... WWIDs multipath users know."""
    from tcmu_py.scsi import naa_from_serial

    naa = naa_from_serial("5a3b9c1e-2f4d-4e6a-8b7c-9d0e1f2a3b4c")
    assert naa.hex() == "60014055a3b9c1e2f4d4e6a8b7c9d0e1"
    assert naa_from_serial("").hex() == "60014050" + "0" * 24
    assert naa_from_serial("\u0663\u0664zz12") == naa_from_serial("12")  # non-ASCII digits skipped


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_first_difference_finds_the_first_differing_byte(a, b):
    from tcmu_py.scsi._common import first_difference

    naive = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if naive is None:
        naive = -1 if len(a) == len(b) else min(len(a), len(b))
    assert first_difference(a, b) == naive
    assert first_difference(a + b"x" * 5000, a + b"x" * 4000 + b"y" + b"x" * 999) == len(a) + 4000
