"""SBC-3 commands as an initiator sees them: capacity, reads and writes, verification,
provisioning, COMPARE AND WRITE, FORMAT UNIT and START STOP UNIT.

Expected values are written from SBC-3 (SBC-4 for NDOB and BYTCHK 11b), cited per
row.  Default device: 128 blocks of 512 bytes; the handler can flush and unmap (unmapped
blocks read zero) and report LBA status; MAXIMUM TRANSFER LENGTH 128 blocks.
"""

from __future__ import annotations

import pytest
from scsi_exec import (
    CC,
    ILLEGAL,
    Case,
    be,
    cdb6,
    check,
    decode_sense,
    rw6,
    rw10,
    rw12,
    rw16,
    sa_in16,
    unmap_cdb,
    unmap_params,
)

from tcmu_py.scsi import Caps, SenseKey

BS = 512
MISCOMPARE = SenseKey.MISCOMPARE
DATA_PROTECT = SenseKey.DATA_PROTECT
RO = {"caps": Caps(flush=True, readonly=True)}


def blocks(n: int, fill: int = 0xA5) -> bytes:
    return bytes([fill]) * (n * BS)


SBC_CASES = [
    # ---- READ CAPACITY -----------------------------------------------------------------------
    Case(
        "read capacity (10)",
        "SBC-3 READ CAPACITY (10): last LBA, block length",
        rw10(0x25, 0, 0),
        alloc=8,
        data=be(127, 4) + be(512, 4),
    ),
    Case(
        "read capacity (10), last LBA FFFFFFFEh",
        "SBC-3 READ CAPACITY (10)",
        rw10(0x25, 0, 0),
        alloc=8,
        dev={"num_lbas": 0xFFFFFFFF},
        data=be(0xFFFFFFFE, 4) + be(512, 4),
    ),
    Case(
        "read capacity (10), more blocks than 32 bits",
        "SBC-3 READ CAPACITY (10): FFFFFFFFh when the LBA does not fit",
        rw10(0x25, 0, 0),
        alloc=8,
        dev={"num_lbas": 2**32 + 10, "block_size": 4096},
        data=be(0xFFFFFFFF, 4) + be(4096, 4),
    ),
    Case(
        "read capacity (16)",
        "SBC-3 READ CAPACITY (16) parameter data: LBPME, LBPRZ",
        sa_in16(0x10, 32),
        alloc=32,
        data=be(127, 8) + be(512, 4) + bytes((0, 0, 0xC0, 0)) + bytes(16),
    ),
    Case(
        "read capacity (16), huge device and physical block exponent",
        "SBC-3 READ CAPACITY (16): LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT",
        sa_in16(0x10, 32),
        alloc=32,
        dev={"num_lbas": 2**40, "lbppbe": 3, "caps": Caps()},
        data=be(2**40 - 1, 8) + be(512, 4) + bytes((0, 3, 0, 0)) + bytes(16),
    ),
    Case(
        "read capacity (16), allocation length 12",
        "SPC-4 ALLOCATION LENGTH field",
        sa_in16(0x10, 12),
        alloc=12,
        data=be(127, 8) + be(512, 4),
    ),
    # ---- READ / WRITE errors ------------------------------------------------------------------
    Case(
        "read (10) past the last block",
        "SBC-3 READ (10): LOGICAL BLOCK ADDRESS OUT OF RANGE",
        rw10(0x28, 127, 2),
        CC,
        (ILLEGAL, 0x21, 0x00),
        alloc=2 * BS,
    ),
    Case(
        "read (16) at a 64-bit LBA",
        "SBC-3 READ (16): LOGICAL BLOCK ADDRESS OUT OF RANGE",
        rw16(0x88, 2**63, 1),
        CC,
        (ILLEGAL, 0x21, 0x00),
        alloc=BS,
    ),
    Case(
        "read (12) past the last block",
        "SBC-3 READ (12)",
        rw12(0xA8, 120, 9),
        CC,
        (ILLEGAL, 0x21, 0x00),
        alloc=9 * BS,
    ),
    Case(
        "read (10) with RDPROTECT",
        "SBC-3 READ (10): RDPROTECT non-zero without protection information",
        rw10(0x28, 0, 1, flags=0x20),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=BS,
        field=(1, 7, True),
    ),
    Case(
        "write (16) with WRPROTECT",
        "SBC-3 WRITE (16): WRPROTECT non-zero without protection information",
        rw16(0x8A, 0, 1, flags=0x40),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=blocks(1),
        field=(1, 7, True),
    ),
    Case(
        "read (10) beyond the maximum transfer length",
        "SBC-3 Block Limits VPD page: MAXIMUM TRANSFER LENGTH",
        rw10(0x28, 0, 129),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=129 * BS,
        dev={"num_lbas": 1024},
    ),
    Case(
        "read (10) with zero blocks",
        "SBC-3 READ (10): TRANSFER LENGTH 0 is not an error",
        rw10(0x28, 5, 0),
        data=b"",
    ),
    Case(
        "read (10), data buffer disagrees with the transfer length",
        "tcmu contract: a CDB whose length disagrees with the buffer gets CHECK CONDITION",
        rw10(0x28, 0, 2),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=BS,
    ),
    Case(
        "write (10) to a write-protected device",
        "SBC-3 write protection: DATA PROTECT, WRITE PROTECTED",
        rw10(0x2A, 0, 1),
        CC,
        (DATA_PROTECT, 0x27, 0x00),
        data_out=blocks(1),
        dev=RO,
    ),
    Case(
        "write (6) to a write-protected device",
        "SBC-3 write protection",
        rw6(0x0A, 0, 1),
        CC,
        (DATA_PROTECT, 0x27, 0x00),
        data_out=blocks(1),
        dev=RO,
    ),
    Case(
        "read from a write-protected device",
        "SBC-3 write protection: reads are allowed",
        rw10(0x28, 0, 1),
        alloc=BS,
        dev=RO,
        data=bytes(BS),
    ),
    # ---- SYNCHRONIZE CACHE ------------------------------------------------------------------
    Case("synchronize cache (10)", "SBC-3 SYNCHRONIZE CACHE (10)", rw10(0x35, 0, 0)),
    Case("synchronize cache (16)", "SBC-3 SYNCHRONIZE CACHE (16)", rw16(0x91, 10, 20)),
    Case(
        "synchronize cache past the last block",
        "SBC-3 SYNCHRONIZE CACHE (10): LBA OUT OF RANGE",
        rw10(0x35, 120, 10),
        CC,
        (ILLEGAL, 0x21, 0x00),
    ),
    Case(
        "synchronize cache without a handler cache",
        "SBC-3 SYNCHRONIZE CACHE: nothing volatile to synchronize",
        rw10(0x35, 0, 0),
        dev={"caps": Caps()},
    ),
    # ---- VERIFY -----------------------------------------------------------------------------
    Case("verify (10), medium verification", "SBC-3 VERIFY (10) BYTCHK=0", rw10(0x2F, 0, 8)),
    Case(
        "verify (10), zero blocks",
        "SBC-3 VERIFY (10): VERIFICATION LENGTH 0 is not an error",
        rw10(0x2F, 0, 0, flags=0x02),
    ),
    Case(
        "verify (12) past the last block",
        "SBC-3 VERIFY (12): LBA OUT OF RANGE",
        rw12(0xAF, 100, 29),
        CC,
        (ILLEGAL, 0x21, 0x00),
    ),
    Case(
        "verify (16) with VRPROTECT",
        "SBC-3 VERIFY (16): VRPROTECT without protection information",
        rw16(0x8F, 0, 1, flags=0x20),
        CC,
        (ILLEGAL, 0x24, 0x00),
    ),
    Case(
        "verify, reserved BYTCHK 10b",
        "SBC-4 VERIFY: BYTCHK 10b reserved",
        rw10(0x2F, 0, 1, flags=0x04),
        CC,
        (ILLEGAL, 0x24, 0x00),
    ),
    Case(
        "verify (10), BYTCHK=1 against zeroes",
        "SBC-3 VERIFY (10) BYTCHK=1: byte-by-byte comparison",
        rw10(0x2F, 0, 2, flags=0x02),
        data_out=bytes(2 * BS),
    ),
    Case(
        "verify (10), BYTCHK=1 miscompare",
        "SBC-3 VERIFY: MISCOMPARE DURING VERIFY OPERATION, INFORMATION = offset",
        rw10(0x2F, 0, 2, flags=0x02),
        CC,
        (MISCOMPARE, 0x1D, 0x00),
        data_out=bytes(700) + b"\x01" + bytes(2 * BS - 701),
    ),
    Case(
        "verify (16), BYTCHK 11b: one block against each",
        "SBC-4 VERIFY (16) BYTCHK 11b",
        rw16(0x8F, 0, 4, flags=0x06),
        data_out=bytes(BS),
    ),
    # ---- WRITE AND VERIFY -------------------------------------------------------------------
    Case(
        "write and verify (10) on a write-protected device",
        "SBC-3 write protection",
        rw10(0x2E, 0, 1, flags=0x02),
        CC,
        (DATA_PROTECT, 0x27, 0x00),
        data_out=blocks(1),
        dev=RO,
    ),
    Case(
        "write and verify (16) past the last block",
        "SBC-3 WRITE AND VERIFY (16)",
        rw16(0x8E, 127, 2, flags=0x02),
        CC,
        (ILLEGAL, 0x21, 0x00),
        data_out=blocks(2),
    ),
    # ---- WRITE SAME -------------------------------------------------------------------------
    Case(
        "write same (16), zero blocks",
        "SBC-3 Block Limits WSNZ=1: NUMBER OF LOGICAL BLOCKS 0 refused",
        rw16(0x93, 0, 0),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=blocks(1),
    ),
    Case(
        "write same (16) with ANCHOR",
        "SBC-4 WRITE SAME: ANCHOR=1 with ANC_SUP=0 is INVALID FIELD IN CDB",
        rw16(0x93, 0, 4, flags=0x18),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=bytes(BS),
        field=(1, 4, True),
    ),
    Case(
        "write same (10) beyond MAXIMUM WRITE SAME LENGTH",
        "SBC-3 WRITE SAME (10): NUMBER OF LOGICAL BLOCKS > MAXIMUM WRITE SAME LENGTH",
        rw10(0x41, 0, 16),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=blocks(1),
        dev={"max_write_same_lbas": 8},
    ),
    Case(
        "write same (10) past the last block",
        "SBC-3 WRITE SAME (10): LBA OUT OF RANGE",
        rw10(0x41, 100, 29),
        CC,
        (ILLEGAL, 0x21, 0x00),
        data_out=blocks(1),
    ),
    Case(
        "write same (10) to a write-protected device",
        "SBC-3 write protection",
        rw10(0x41, 0, 2),
        CC,
        (DATA_PROTECT, 0x27, 0x00),
        data_out=blocks(1),
        dev=RO,
    ),
    Case(
        "write same (10) with PBDATA",
        "SBC-3 WRITE SAME (10): PBDATA/LBDATA not supported",
        rw10(0x41, 0, 2, flags=0x04),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=blocks(1),
    ),
    Case(
        "write same (16) with WRPROTECT",
        "SBC-3 WRITE SAME (16): WRPROTECT without protection information",
        rw16(0x93, 0, 2, flags=0x20),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=blocks(1),
    ),
    Case(
        "write and verify, reserved BYTCHK",
        "SBC-4 WRITE AND VERIFY: BYTCHK 1xb reserved",
        rw10(0x2E, 0, 1, flags=0x04),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=blocks(1),
    ),
    # ---- UNMAP -------------------------------------------------------------------------------
    Case("unmap, no parameter data", "SBC-3 UNMAP: PARAMETER LIST LENGTH 0", unmap_cdb(0)),
    Case(
        "unmap, parameter list shorter than its header",
        "SBC-3 UNMAP: PARAMETER LIST LENGTH 1..7 is a PARAMETER LIST LENGTH ERROR",
        unmap_cdb(6),
        CC,
        (ILLEGAL, 0x1A, 0x00),
        data_out=bytes(6),
    ),
    Case(
        "unmap past the last block",
        "SBC-3 UNMAP block descriptor: LBA OUT OF RANGE",
        unmap_cdb(24),
        CC,
        (ILLEGAL, 0x21, 0x00),
        data_out=unmap_params((120, 9)),
    ),
    Case(
        "unmap, too many descriptors",
        "SBC-3 UNMAP: descriptors > MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT",
        unmap_cdb(40),
        CC,
        (ILLEGAL, 0x26, 0x00),
        data_out=unmap_params((0, 1), (2, 1)),
        dev={"max_unmap_descs": 1},
    ),
    Case(
        "unmap, too many blocks",
        "SBC-3 UNMAP: total > MAXIMUM UNMAP LBA COUNT",
        unmap_cdb(40),
        CC,
        (ILLEGAL, 0x26, 0x00),
        data_out=unmap_params((0, 10), (20, 10)),
        dev={"max_unmap_lbas": 16},
    ),
    Case(
        "unmap with ANCHOR",
        "SBC-3 UNMAP: ANCHOR=1 with ANC_SUP=0",
        unmap_cdb(24, anchor=True),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=unmap_params((0, 1)),
    ),
    Case(
        "unmap on a handler that cannot",
        "SPC-4 OPERATION CODE: unsupported operation code",
        unmap_cdb(24),
        CC,
        (ILLEGAL, 0x20, 0x00),
        data_out=unmap_params((0, 1)),
        dev={"caps": Caps(flush=True)},
    ),
    Case(
        "unmap, descriptor with zero blocks",
        "SBC-3 UNMAP block descriptor: NUMBER OF LOGICAL BLOCKS 0 is not an error",
        unmap_cdb(24),
        data_out=unmap_params((5, 0)),
    ),
    # ---- GET LBA STATUS -----------------------------------------------------------------------
    Case(
        "get lba status, fully mapped",
        "SBC-3 GET LBA STATUS: one descriptor from the starting LBA",
        sa_in16(0x12, 64, lba=10),
        alloc=64,
        data=be(20, 4) + bytes(4) + be(10, 8) + be(118, 4) + bytes(4),
    ),
    Case(
        "get lba status past the last block",
        "SBC-3 GET LBA STATUS: STARTING LBA beyond the last LBA",
        sa_in16(0x12, 64, lba=128),
        CC,
        (ILLEGAL, 0x21, 0x00),
        alloc=64,
    ),
    Case(
        "get lba status on a handler that cannot tell",
        "SPC-4 reserved CDB field value: unserved service action of a served opcode",
        sa_in16(0x12, 64),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=64,
        dev={"caps": Caps(flush=True, unmap=True)},
        field=(1, 4, True),
    ),
    # ---- COMPARE AND WRITE ------------------------------------------------------------------
    Case(
        "compare and write, two blocks",
        "SBC-3 COMPARE AND WRITE: NUMBER OF LOGICAL BLOCKS > MAXIMUM COMPARE AND WRITE LENGTH",
        rw16(0x89, 0, 0) [:13] + bytes((2, 0, 0)),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=bytes(4 * BS),
        field=(13, 7, True),
    ),
    Case(
        "compare and write, zero blocks",
        "SBC-3 COMPARE AND WRITE: NUMBER OF LOGICAL BLOCKS 0 is not an error",
        bytes((0x89, 0)) + be(0, 8) + bytes(6),
    ),
    Case(
        "compare and write past the last block",
        "SBC-3 COMPARE AND WRITE: LBA OUT OF RANGE",
        bytes((0x89, 0)) + be(128, 8) + bytes(3) + b"\x01\0\0",
        CC,
        (ILLEGAL, 0x21, 0x00),
        data_out=bytes(2 * BS),
    ),
    Case(
        "compare and write on a write-protected device",
        "SBC-3 write protection",
        bytes((0x89, 0)) + be(0, 8) + bytes(3) + b"\x01\0\0",
        CC,
        (DATA_PROTECT, 0x27, 0x00),
        data_out=bytes(2 * BS),
        dev=RO,
    ),
    # ---- FORMAT UNIT -------------------------------------------------------------------------
    Case(
        "format unit with FMTPINFO",
        "SBC-3 FORMAT UNIT: protection information not supported",
        cdb6(0x04, b1=0x80),
        CC,
        (ILLEGAL, 0x24, 0x00),
    ),
    Case(
        "format unit with a defect list",
        "SBC-3 FORMAT UNIT parameter list: DEFECT LIST LENGTH",
        cdb6(0x04, b1=0x10),
        CC,
        (ILLEGAL, 0x26, 0x00),
        data_out=bytes((0, 0)) + be(8, 2) + bytes(8),
    ),
    Case(
        "format unit with an initialization pattern",
        "SBC-3 FORMAT UNIT parameter list header: IP",
        cdb6(0x04, b1=0x10),
        CC,
        (ILLEGAL, 0x26, 0x00),
        data_out=bytes((0, 0x88, 0, 0)),
    ),
    Case(
        "format unit with protection field usage",
        "SBC-3 FORMAT UNIT parameter list header: PROTECTION FIELD USAGE",
        cdb6(0x04, b1=0x10),
        CC,
        (ILLEGAL, 0x26, 0x00),
        data_out=bytes((0x01, 0, 0, 0)),
    ),
    Case(
        "format unit, long list header",
        "SBC-3 FORMAT UNIT LONGLIST=1: 8-byte header",
        cdb6(0x04, b1=0x30),
        data_out=bytes(8),
    ),
    Case(
        "format unit, header truncated",
        "SBC-3 FORMAT UNIT: FMTDATA=1 needs the parameter list header",
        cdb6(0x04, b1=0x10),
        CC,
        (ILLEGAL, 0x1A, 0x00),
        data_out=bytes(2),
    ),
    Case(
        "format unit on a write-protected device",
        "SBC-3 write protection",
        cdb6(0x04),
        CC,
        (DATA_PROTECT, 0x27, 0x00),
        dev=RO,
    ),
    # ---- START STOP UNIT ---------------------------------------------------------------------
    Case("start stop unit, start", "SBC-3 START STOP UNIT START=1", cdb6(0x1B, b4=0x01)),
    Case(
        "start stop unit, power condition",
        "SBC-3 START STOP UNIT: POWER CONDITION not supported",
        cdb6(0x1B, b4=0x21),
        CC,
        (ILLEGAL, 0x24, 0x00),
        field=(4, 7, True),
    ),
    Case(
        "start stop unit, power condition modifier",
        "SBC-3 START STOP UNIT: POWER CONDITION MODIFIER not supported",
        cdb6(0x1B, b3=0x01, b4=0x01),
        CC,
        (ILLEGAL, 0x24, 0x00),
    ),
    Case(
        "start stop unit, stop",
        "SBC-3 START STOP UNIT START=0: refused, the medium cannot be stopped (as tcmu-runner)",
        cdb6(0x1B, b4=0x00),
        CC,
        (ILLEGAL, 0x24, 0x00),
    ),
]


@pytest.mark.parametrize("case", SBC_CASES, ids=lambda c: c.name)
def test_sbc_command_table(case, scsi_device, scsi_run):
    check(case, scsi_device, scsi_run)


# ---- data round trips -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("write", "read"),
    [
        (rw6(0x0A, 5, 3), rw6(0x08, 5, 3)),
        (rw10(0x2A, 5, 3), rw10(0x28, 5, 3)),
        (rw12(0xAA, 5, 3), rw12(0xA8, 5, 3)),
        (rw16(0x8A, 5, 3), rw16(0x88, 5, 3)),
        (rw10(0x2E, 5, 3, flags=0x02), rw16(0x88, 5, 3)),  # WRITE AND VERIFY (10)
        (rw12(0xAE, 5, 3), rw10(0x28, 5, 3)),  # WRITE AND VERIFY (12), BYTCHK=0
        (rw16(0x8E, 5, 3, flags=0x02), rw12(0xA8, 5, 3)),  # WRITE AND VERIFY (16)
    ],
    ids=["6", "10", "12", "16", "wv10", "wv12", "wv16"],
)
def test_written_blocks_read_back(scsi_device, scsi_run, write, read):
    """SBC-3 READ/WRITE: what is written at an LBA is what a read returns."""
    dev = scsi_device()
    data = bytes(range(256)) * 6
    assert scsi_run(dev, write, data).status == 0
    res = scsi_run(dev, read, alloc_len=3 * BS)
    assert res.status == 0 and res.data == data
    assert scsi_run(dev, rw10(0x28, 4, 1), alloc_len=BS).data == bytes(BS)  # neighbours untouched
    assert scsi_run(dev, rw10(0x28, 8, 1), alloc_len=BS).data == bytes(BS)


def test_read_6_transfer_length_zero_means_256_blocks(scsi_device, scsi_run):
    """SBC-3 READ (6): a TRANSFER LENGTH of 0 specifies 256 logical blocks."""
    dev = scsi_device(num_lbas=512, max_xfer_len=256)
    res = scsi_run(dev, rw6(0x08, 0, 0), alloc_len=256 * BS)
    assert res.status == 0 and len(res.data) == 256 * BS


def test_last_block_is_readable_and_writable(scsi_device, scsi_run):
    dev = scsi_device()
    assert scsi_run(dev, rw16(0x8A, 127, 1), blocks(1, 0x42)).status == 0
    assert scsi_run(dev, rw16(0x88, 127, 1), alloc_len=BS).data == blocks(1, 0x42)


def test_verify_reports_the_offset_of_the_first_difference(scsi_device, scsi_run):
    """SBC-3 VERIFY: INFORMATION = offset from the start of the Data-Out Buffer."""
    dev = scsi_device()
    scsi_run(dev, rw10(0x2A, 10, 2), blocks(2, 0x11))
    expected = bytearray(blocks(2, 0x11))
    expected[777] = 0x12
    res = scsi_run(dev, rw10(0x2F, 10, 2, flags=0x02), bytes(expected))
    s = decode_sense(res.sense)
    assert res.status == CC and (s.key, s.asc, s.ascq, s.info) == (MISCOMPARE, 0x1D, 0x00, 777)
    assert scsi_run(dev, rw10(0x2F, 10, 2, flags=0x02), blocks(2, 0x11)).status == 0


def test_verify_bytchk_11_compares_one_block_with_each(scsi_device, scsi_run):
    dev = scsi_device()
    scsi_run(dev, rw10(0x2A, 0, 3), blocks(2, 0x33) + blocks(1, 0x34))
    res = scsi_run(dev, rw16(0x8F, 0, 3, flags=0x06), blocks(1, 0x33))
    s = decode_sense(res.sense)
    assert (s.key, s.asc, s.info) == (MISCOMPARE, 0x1D, 2 * BS)
    assert scsi_run(dev, rw16(0x8F, 0, 2, flags=0x06), blocks(1, 0x33)).status == 0


def test_write_same_writes_the_block_everywhere(scsi_device, scsi_run):
    """SBC-3 WRITE SAME (10): one block of data written to each LBA of the range."""
    dev = scsi_device()
    block = bytes(range(256)) * 2
    assert scsi_run(dev, rw10(0x41, 3, 5), block).status == 0
    assert scsi_run(dev, rw10(0x28, 3, 5), alloc_len=5 * BS).data == block * 5
    assert scsi_run(dev, rw10(0x28, 8, 1), alloc_len=BS).data == bytes(BS)


def test_write_same_with_unmap_deallocates_zero_blocks(scsi_device, scsi_run):
    """SBC-3 WRITE SAME (16) UNMAP=1: the LBAs may be unmapped (LBPRZ: read as zero)."""
    dev = scsi_device()
    scsi_run(dev, rw10(0x2A, 0, 16), blocks(16))
    assert scsi_run(dev, rw16(0x93, 4, 8, flags=0x08), bytes(BS)).status == 0
    assert scsi_run(dev, rw10(0x28, 4, 8), alloc_len=8 * BS).data == bytes(8 * BS)
    status = scsi_run(dev, sa_in16(0x12, 64, lba=0), alloc_len=64).data
    # SBC-3 GET LBA STATUS descriptors: mapped 0-3, deallocated 4-11, mapped 12-127
    assert status[8:] == (
        be(0, 8) + be(4, 4) + bytes(4) + be(4, 8) + be(8, 4) + b"\x01" + bytes(3)
        + be(12, 8) + be(116, 4) + bytes(4)
    )


def test_write_same_with_unmap_writes_a_nonzero_block(scsi_device, scsi_run):
    """SBC-3: after WRITE SAME, reads return the Data-Out block whatever UNMAP says."""
    dev = scsi_device()
    assert scsi_run(dev, rw16(0x93, 0, 4, flags=0x08), blocks(1, 0x77)).status == 0
    assert scsi_run(dev, rw10(0x28, 0, 4), alloc_len=4 * BS).data == blocks(4, 0x77)


def test_write_same_16_ndob_writes_zeroes_without_data(scsi_device, scsi_run):
    """SBC-4 WRITE SAME (16) NDOB=1: no Data-Out Buffer; user data all zeroes."""
    dev = scsi_device()
    scsi_run(dev, rw10(0x2A, 0, 4), blocks(4))
    assert scsi_run(dev, rw16(0x93, 0, 4, flags=0x01)).status == 0
    assert scsi_run(dev, rw10(0x28, 0, 4), alloc_len=4 * BS).data == bytes(4 * BS)


def test_unmap_deallocates_and_reads_zero(scsi_device, scsi_run):
    """SBC-3 UNMAP with LBPRZ=1: unmapped LBAs read as zeroes."""
    dev = scsi_device()
    scsi_run(dev, rw10(0x2A, 0, 16), blocks(16))
    params = unmap_params((2, 3), (10, 2))
    assert scsi_run(dev, unmap_cdb(len(params)), params).status == 0
    got = scsi_run(dev, rw10(0x28, 0, 16), alloc_len=16 * BS).data
    expect = blocks(2) + bytes(3 * BS) + blocks(5) + bytes(2 * BS) + blocks(4)
    assert got == expect


def test_unmap_ignores_a_truncated_descriptor(scsi_device, scsi_run):
    """SBC-3 UNMAP: a descriptor cut short by the PARAMETER LIST LENGTH is ignored."""
    dev = scsi_device()
    scsi_run(dev, rw10(0x2A, 0, 16), blocks(16))
    params = unmap_params((0, 1), (8, 1))[:8 + 16 + 8]
    assert scsi_run(dev, unmap_cdb(len(params)), params).status == 0
    assert scsi_run(dev, rw10(0x28, 8, 1), alloc_len=BS).data == blocks(1)
    assert scsi_run(dev, rw10(0x28, 0, 1), alloc_len=BS).data == bytes(BS)


def test_unmap_validates_every_descriptor_before_unmapping(scsi_device, scsi_run):
    dev = scsi_device()
    scsi_run(dev, rw10(0x2A, 0, 4), blocks(4))
    params = unmap_params((0, 2), (127, 5))
    assert scsi_run(dev, unmap_cdb(len(params)), params).status == CC
    assert scsi_run(dev, rw10(0x28, 0, 2), alloc_len=2 * BS).data == blocks(2)


def test_compare_and_write_writes_on_match(scsi_device, scsi_run):
    """SBC-3 COMPARE AND WRITE: verify instance equal -> write instance written."""
    dev = scsi_device()
    scsi_run(dev, rw10(0x2A, 7, 1), blocks(1, 0x01))
    cdb = bytes((0x89, 0)) + be(7, 8) + bytes(3) + b"\x01\0\0"
    assert scsi_run(dev, cdb, blocks(1, 0x01) + blocks(1, 0x02)).status == 0
    assert scsi_run(dev, rw10(0x28, 7, 1), alloc_len=BS).data == blocks(1, 0x02)


@pytest.mark.parametrize("native", [False, True], ids=["emulated", "native"])
def test_compare_and_write_miscompare_reports_the_offset(scsi_device, scsi_run, native):
    """SBC-3 COMPARE AND WRITE: MISCOMPARE DURING VERIFY OPERATION, INFORMATION = offset
    of the first byte that was not equal; nothing is written."""
    dev = scsi_device(caps=Caps(flush=True, caw=native))
    scsi_run(dev, rw10(0x2A, 7, 1), blocks(1, 0x01))
    verify = bytearray(blocks(1, 0x01))
    verify[10] = 0xFF
    cdb = bytes((0x89, 0)) + be(7, 8) + bytes(3) + b"\x01\0\0"
    res = scsi_run(dev, cdb, bytes(verify) + blocks(1, 0x02))
    s = decode_sense(res.sense)
    assert res.status == CC and (s.key, s.asc, s.ascq, s.info) == (MISCOMPARE, 0x1D, 0x00, 10)
    assert scsi_run(dev, rw10(0x28, 7, 1), alloc_len=BS).data == blocks(1, 0x01)


def test_format_unit_zeroes_the_medium(scsi_device, scsi_run):
    """SBC-3 FORMAT UNIT FMTDATA=0: the command completes when the format is done."""
    dev = scsi_device()
    scsi_run(dev, rw10(0x2A, 0, 128), blocks(128))
    assert scsi_run(dev, cdb6(0x04)).status == 0
    assert scsi_run(dev, rw10(0x28, 0, 128), alloc_len=128 * BS).data == bytes(128 * BS)
    assert scsi_run(dev, cdb6(0x00)).status == 0
