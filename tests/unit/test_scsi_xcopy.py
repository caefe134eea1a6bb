"""EXTENDED COPY (LID1) and RECEIVE COPY RESULTS, from SPC-4 (EXTENDED COPY, CSCD and
segment descriptors, RECEIVE COPY RESULTS OPERATING PARAMETERS) and the compatibility
contract (block -> block between devices of this runner, matched by NAA;
reference/tcmu.md §2.7)."""

from __future__ import annotations

import pytest
from scsi_exec import (
    CC,
    ILLEGAL,
    Case,
    b2b_segment,
    be,
    check,
    decode_sense,
    id_target,
    rw10,
    xcopy_cdb,
    xcopy_params,
)

from tcmu_py.scsi import SenseKey, naa_from_serial

BS = 512
SERIAL = "0123456789abcdef0123456789abcdef"
SELF = naa_from_serial(SERIAL)
NOBODY = bytes.fromhex("6001405" + "f" * 25)
COPY_ABORTED = SenseKey.COPY_ABORTED


def _refused(name: str, clause: str, params: bytes, sense: tuple[int, int, int]) -> Case:
    return Case(name, clause, xcopy_cdb(len(params)), CC, sense, data_out=params)


XCOPY_CASES = [
    Case(
        "extended copy, no parameter data",
        "SPC-4 EXTENDED COPY: PARAMETER LIST LENGTH 0 is not an error",
        xcopy_cdb(0),
    ),
    Case(
        "extended copy, header truncated",
        "SPC-4 EXTENDED COPY: parameter list shorter than its header",
        xcopy_cdb(8),
        CC,
        (ILLEGAL, 0x1A, 0x00),
        data_out=bytes(8),
    ),
    _refused(
        "extended copy to an unknown device",
        "SPC-4 EXTENDED COPY: COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE",
        xcopy_params([id_target(SELF), id_target(NOBODY)], [b2b_segment(0, 1, 1, 0, 0)]),
        (COPY_ABORTED, 0x0D, 0x02),
    ),
    _refused(
        "extended copy, unsupported segment descriptor",
        "SPC-4 EXTENDED COPY: UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE",
        xcopy_params([id_target(SELF)], [bytes((0x0A, 0)) + be(0x18, 2) + bytes(24)]),
        (ILLEGAL, 0x26, 0x09),
    ),
    _refused(
        "extended copy, unsupported target descriptor",
        "SPC-4 EXTENDED COPY: UNSUPPORTED TARGET DESCRIPTOR TYPE CODE",
        xcopy_params([bytes((0xE0,)) + bytes(31)], [b2b_segment(0, 0, 1, 0, 1)]),
        (ILLEGAL, 0x26, 0x07),
    ),
    _refused(
        "extended copy, too many target descriptors",
        "SPC-4 EXTENDED COPY: TOO MANY TARGET DESCRIPTORS (MAXIMUM TARGET COUNT 2)",
        xcopy_params([id_target(SELF)] * 3, [b2b_segment(0, 0, 1, 0, 1)]),
        (ILLEGAL, 0x26, 0x06),
    ),
    _refused(
        "extended copy, too many segment descriptors",
        "SPC-4 EXTENDED COPY: TOO MANY SEGMENT DESCRIPTORS (MAXIMUM SEGMENT COUNT 1)",
        xcopy_params([id_target(SELF)], [b2b_segment(0, 0, 1, 0, 1)] * 2),
        (ILLEGAL, 0x26, 0x08),
    ),
    _refused(
        "extended copy, segment names a missing target",
        "SPC-4 segment descriptors: CSCD DESCRIPTOR ID out of the list",
        xcopy_params([id_target(SELF)], [b2b_segment(0, 3, 1, 0, 1)]),
        (ILLEGAL, 0x26, 0x00),
    ),
    _refused(
        "extended copy past the last block",
        "SPC-4 block -> block segment: LBA OUT OF RANGE",
        xcopy_params([id_target(SELF)], [b2b_segment(0, 0, 8, 0, 124)]),
        (ILLEGAL, 0x21, 0x00),
    ),
    _refused(
        "extended copy, reserved LIST ID USAGE",
        "SPC-4 EXTENDED COPY: LIST ID USAGE 01b is reserved",
        xcopy_params([id_target(SELF)], [b2b_segment(0, 0, 1, 0, 1)], list_usage=0b01),
        (ILLEGAL, 0x26, 0x00),
    ),
    _refused(
        "extended copy, target named by a non-binary designator",
        "SPC-4 identification CSCD descriptor: only binary NAA designators are matched",
        xcopy_params([bytes((0xE4, 0, 0, 0, 0x02, 0x01, 0, 8)) + bytes(24)], [b2b_segment(0, 0, 1, 0, 1)]),
        (ILLEGAL, 0x26, 0x00),
    ),
    _refused(
        "extended copy, target is not a block device",
        "SPC-4 CSCD descriptor PERIPHERAL DEVICE TYPE: INCORRECT COPY TARGET DEVICE TYPE",
        xcopy_params([bytes((0xE4, 0x01)) + id_target(SELF)[2:]], [b2b_segment(0, 0, 1, 0, 1)]),
        (COPY_ABORTED, 0x0D, 0x03),
    ),
    _refused(
        "extended copy with inline data",
        "SPC-4 EXTENDED COPY: INLINE DATA LENGTH (no inline segments served)",
        xcopy_params([id_target(SELF)], [b2b_segment(0, 0, 1, 0, 1)])[:12] + be(4, 4)
        + id_target(SELF) + b2b_segment(0, 0, 1, 0, 1) + bytes(4),
        (ILLEGAL, 0x26, 0x00),
    ),
    Case(
        "extended copy of zero blocks",
        "SPC-4 block -> block segment: BLOCK DEVICE NUMBER OF BLOCKS 0 copies nothing",
        xcopy_cdb(16 + 32 + 28),
        data_out=xcopy_params([id_target(SELF)], [b2b_segment(0, 0, 0, 0, 1)]),
    ),
    Case(
        "receive copy results, operating parameters",
        "SPC-4 RECEIVE COPY RESULTS OPERATING PARAMETERS",
        bytes((0x84, 0x03)) + bytes(8) + be(64, 4) + b"\0\0",
        alloc=64,
        data=lambda d: len(d) == 46
        and d[0:4] == be(42, 4)
        and d[4] & 0x01 == 0x01  # SNLID
        and d[8:10] == be(2, 2)  # MAXIMUM TARGET COUNT
        and d[10:12] == be(1, 2)  # MAXIMUM SEGMENT COUNT
        and d[43] == 2
        and set(d[44:46]) == {0x02, 0xE4},
    ),
    Case(
        "receive copy results, copy status",
        "SPC-4 RECEIVE COPY RESULTS: unserved service action",
        bytes((0x84, 0x00)) + bytes(8) + be(64, 4) + b"\0\0",
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=64,
    ),
]


@pytest.mark.parametrize("case", XCOPY_CASES, ids=lambda c: c.name)
def test_xcopy_table(case, scsi_device, scsi_run):
    check(case, scsi_device, scsi_run)


def test_inquiry_names_the_device_with_the_naa_xcopy_matches(scsi_device, scsi_run):
    data = scsi_run(scsi_device(), bytes((0x12, 1, 0x83, 0, 255, 0)), alloc_len=255).data
    assert data[8:24] == SELF


def test_extended_copy_within_one_device(scsi_device, scsi_run):
    dev = scsi_device()
    data = bytes(range(256)) * 8
    scsi_run(dev, rw10(0x2A, 0, 4), data)
    params = xcopy_params([id_target(SELF)], [b2b_segment(0, 0, 4, 0, 64)])
    assert scsi_run(dev, xcopy_cdb(len(params)), params).status == 0
    assert scsi_run(dev, rw10(0x28, 64, 4), alloc_len=4 * BS).data == data


def test_extended_copy_between_devices_of_this_runner(scsi_device, scsi_run):
    src = scsi_device(name="src", serial="aaaa0000bbbb1111cccc2222dddd3333")
    dst = scsi_device(name="dst", serial="eeee4444ffff5555aaaa6666bbbb7777")
    src.link(dst)
    data = b"\x42" * (3 * BS)
    scsi_run(src, rw10(0x2A, 10, 3), data)
    naa_src = naa_from_serial("aaaa0000bbbb1111cccc2222dddd3333")
    naa_dst = naa_from_serial("eeee4444ffff5555aaaa6666bbbb7777")
    # ESXi sends the XCOPY to the destination LUN, naming both.
    params = xcopy_params([id_target(naa_src), id_target(naa_dst)], [b2b_segment(0, 1, 3, 10, 20)])
    assert scsi_run(dst, xcopy_cdb(len(params)), params).status == 0
    assert scsi_run(dst, rw10(0x28, 20, 3), alloc_len=3 * BS).data == data
    assert scsi_run(src, rw10(0x28, 20, 3), alloc_len=3 * BS).data == bytes(3 * BS)


def test_extended_copy_between_block_sizes_is_refused(scsi_device, scsi_run):
    a = scsi_device(name="a", serial="1" * 32)
    b = scsi_device(name="b", serial="2" * 32, block_size=4096)
    a.link(b)
    params = xcopy_params(
        [id_target(naa_from_serial("1" * 32)), id_target(naa_from_serial("2" * 32), 4096)],
        [b2b_segment(0, 1, 1, 0, 0)],
    )
    res = scsi_run(a, xcopy_cdb(len(params)), params)
    s = decode_sense(res.sense)
    assert res.status == CC and (s.key, s.asc, s.ascq) == (COPY_ABORTED, 0x0D, 0x03)
