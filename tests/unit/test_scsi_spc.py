"""SPC-4 commands as an initiator sees them: CDB in, status/sense/data out.

Expected values come from the standard's data layouts (cited per row) and from the
compatibility contract of reference/tcmu.md (vendor, product, LIO's NAA rule); they are
not copied from this code's output.  Default device: 128 blocks of 512 bytes, a handler
that can flush and unmap (LBPRZ) and report LBA status, unit serial
0123456789abcdef0123456789abcdef.
"""

from __future__ import annotations

import logging

import pytest
from scsi_exec import (
    CC,
    ILLEGAL,
    Case,
    be,
    cdb6,
    check,
    decode_sense,
    inquiry,
    maint_in,
    maint_out,
    mode_select6,
    mode_select10,
    mode_sense6,
    mode_sense10,
    rw10,
)

from tcmu_py.scsi import AluaGroup, Caps, SenseKey, add_unit_attention

SERIAL = "0123456789abcdef0123456789abcdef"
# LIO's NAA for that serial: NAA 6, OUI 00-14-05, then the first 25 hex digits.
NAA = bytes.fromhex("6001405" + SERIAL[:25])
UA = SenseKey.UNIT_ATTENTION
NOT_READY = SenseKey.NOT_READY


def _std_ok(d: bytes) -> bool:
    return (
        d[0] == 0x00  # connected direct-access block device
        and d[2] == 0x06  # SPC-4
        and d[3] & 0x0F == 0x02  # RESPONSE DATA FORMAT
        and d[4] + 5 == len(d)  # ADDITIONAL LENGTH describes the rest
        and d[5] & 0x30 == 0x00  # TPGS 00b: no ALUA configured
        and d[5] & 0x08 == 0x08  # 3PC: EXTENDED COPY is served
        and d[7] & 0x02 == 0x02  # CMDQUE
        and d[8:16] == b"LIO-ORG "
        and d[16:32] == b"TCMU device     "
        and d[32:36] == b"0002"
    )


SPC_CASES = [
    Case("test unit ready", "SPC-4 TEST UNIT READY", cdb6(0x00)),
    Case(
        "unserved opcode",
        "SPC-4 OPERATION CODE: unsupported operation code",
        bytes((0xC0,)) + bytes(9),
        CC,
        (ILLEGAL, 0x20, 0x00),
    ),
    Case(
        "unserved service action of a served opcode",
        "SPC-4 reserved CDB field value (T10 reflector 2014-04: INVALID FIELD IN CDB)",
        maint_in(0x05, 255),  # REPORT IDENTIFYING INFORMATION
        CC,
        (ILLEGAL, 0x24, 0x00),
        field=(1, 4, True),
    ),
    Case(
        "opcode with no served service action",
        "SPC-4 OPERATION CODE",
        bytes((0x9F, 0x11)) + bytes(14),  # SERVICE ACTION OUT (16)
        CC,
        (ILLEGAL, 0x20, 0x00),
    ),
    Case(
        "SET TARGET PORT GROUPS without explicit ALUA",
        "SPC-4 SET TARGET PORT GROUPS: only with explicit asymmetric access",
        maint_out(0x0A, 8),
        CC,
        (ILLEGAL, 0x20, 0x00),
    ),
    Case(
        "CDB shorter than its opcode",
        "SPC-4 OPERATION CODE (the group code implies the CDB length)",
        bytes((0x28, 0, 0, 0, 0, 0)),
        CC,
        (ILLEGAL, 0x24, 0x00),
    ),
    Case("empty CDB", "SPC-4 OPERATION CODE", b"", CC, (ILLEGAL, 0x20, 0x00)),
    # ---- REQUEST SENSE -------------------------------------------------------------------
    Case(
        "request sense, nothing pending, fixed format",
        "SPC-4 REQUEST SENSE; 4.5.3 fixed format: 70h, NO SENSE, 00h/00h",
        cdb6(0x03, b4=252),
        alloc=252,
        data=lambda d: len(d) == 18 and d[0] & 0x7F == 0x70 and d[2] & 0x0F == 0 and d[12:14] == b"\0\0",
    ),
    Case(
        "request sense, descriptor format",
        "SPC-4 REQUEST SENSE DESC=1; 4.5.2 descriptor format: 72h",
        cdb6(0x03, b1=0x01, b4=252),
        alloc=252,
        data=lambda d: len(d) == 8 and d[0] == 0x72 and d[1:4] == b"\0\0\0" and d[7] == 0,
    ),
    Case(
        "request sense truncated to the allocation length",
        "SPC-4 ALLOCATION LENGTH field",
        cdb6(0x03, b4=4),
        alloc=4,
        data=lambda d: len(d) == 4 and d[0] == 0x70,
    ),
    # ---- INQUIRY ---------------------------------------------------------------------------
    Case("standard inquiry", "SPC-4 standard INQUIRY data", inquiry(), alloc=255, data=_std_ok),
    Case(
        "standard inquiry, 36 bytes",
        "SPC-4 ALLOCATION LENGTH field",
        inquiry(alloc=36),
        alloc=36,
        data=lambda d: len(d) == 36 and d[8:36] == b"LIO-ORG TCMU device     0002",
    ),
    Case("inquiry, allocation length 0", "SPC-4 ALLOCATION LENGTH field", inquiry(alloc=0), data=b""),
    Case(
        "inquiry, TPGS for implicit ALUA",
        "SPC-4 standard INQUIRY data, TPGS 01b",
        inquiry(),
        alloc=255,
        dev={"alua_implicit": True},
        data=lambda d: d[5] & 0x30 == 0x10,
    ),
    Case(
        "inquiry, TPGS for implicit and explicit ALUA",
        "SPC-4 standard INQUIRY data, TPGS 11b",
        inquiry(),
        alloc=255,
        dev={"alua_implicit": True, "alua_explicit": True},
        data=lambda d: d[5] & 0x30 == 0x30,
    ),
    Case(
        "page code without EVPD",
        "SPC-4 INQUIRY: EVPD=0 and PAGE CODE not 0",
        inquiry(page=0x80),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=255,
        field=(2, 7, True),
    ),
    Case(
        "unsupported VPD page",
        "SPC-4 INQUIRY: VPD page not supported",
        inquiry(evpd=1, page=0xC0),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=255,
        field=(2, 7, True),
    ),
    Case(
        "CMDDT",
        "SPC-4 INQUIRY: CMDDT obsolete",
        inquiry(b1=0x02),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=255,
    ),
    Case(
        "VPD supported pages",
        "SPC-4 Supported VPD Pages: ascending, starting with 00h",
        inquiry(1, 0x00),
        alloc=255,
        data=bytes((0, 0, 0, 7, 0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2)),
    ),
    Case(
        "VPD unit serial number",
        "SPC-4 Unit Serial Number VPD page; configfs wwn/vpd_unit_serial",
        inquiry(1, 0x80),
        alloc=255,
        data=bytes((0, 0x80, 0, 32)) + SERIAL.encode(),
    ),
    Case(
        "VPD device identification: NAA and T10 vendor ID",
        "SPC-4 Device Identification VPD page (NAA 6 IEEE Registered Extended, T10 vendor ID)",
        inquiry(1, 0x83),
        alloc=255,
        data=bytes((0, 0x83, 0, 64))
        + bytes((0x01, 0x03, 0, 16)) + NAA
        + bytes((0x02, 0x01, 0, 40)) + b"LIO-ORG " + SERIAL.encode(),
    ),
    Case(
        "VPD device identification with port and group",
        "SPC-4 relative target port / target port group designators, association 01b",
        inquiry(1, 0x83),
        alloc=255,
        dev={"rel_port_id": 3, "local_group_id": 7},
        data=lambda d: d[4 + 20 + 44 :] == bytes((1, 0x14, 0, 4, 0, 0, 0, 3, 1, 0x15, 0, 4, 0, 0, 0, 7))
        and d[2:4] == be(80, 2),
    ),
    Case(
        "VPD extended inquiry data",
        "SPC-4 Extended INQUIRY Data VPD page: length 3Ch",
        inquiry(1, 0x86),
        alloc=255,
        data=lambda d: d[:4] == bytes((0, 0x86, 0, 0x3C)) and len(d) == 64 and d[6] & 0x01 == 0,
    ),
    Case(
        "VPD extended inquiry data, volatile cache",
        "SPC-4 Extended INQUIRY Data: V_SUP",
        inquiry(1, 0x86),
        alloc=255,
        dev={"write_cache": True},
        data=lambda d: d[6] & 0x01 == 0x01,
    ),
    Case(
        "VPD block limits",
        "SBC-3 Block Limits VPD page",
        inquiry(1, 0xB0),
        alloc=255,
        dev={"max_xfer_len": 2048},
        data=bytes((0, 0xB0, 0, 0x3C, 0x01, 0x01, 0, 0))
        + be(2048, 4) + be(2048, 4) + be(0, 4)
        + be(32 * 1024 * 1024, 4) + be(256, 4) + be(1, 4) + be(0x80000000, 4)
        + be(0xFFFFFFFF, 8) + bytes(20),
    ),
    Case(
        "VPD block limits without unmap",
        "SBC-3 Block Limits VPD page: unmap fields zero when UNMAP is not supported",
        inquiry(1, 0xB0),
        alloc=255,
        dev={"caps": Caps(flush=True)},
        data=lambda d: d[20:36] == bytes(16),
    ),
    Case(
        "VPD block device characteristics, non-rotating",
        "SBC-3 Block Device Characteristics VPD page: MEDIUM ROTATION RATE 0001h",
        inquiry(1, 0xB1),
        alloc=255,
        dev={"solid_state": True},
        data=bytes((0, 0xB1, 0, 0x3C, 0, 1)) + bytes(58),
    ),
    Case(
        "VPD logical block provisioning",
        "SBC-3 Logical Block Provisioning VPD page: LBPU LBPWS LBPWS10 LBPRZ, thin",
        inquiry(1, 0xB2),
        alloc=255,
        data=bytes((0, 0xB2, 0, 4, 0, 0xE4, 0x02, 0)),
    ),
    Case(
        "VPD logical block provisioning, no unmap",
        "SBC-3 Logical Block Provisioning VPD page",
        inquiry(1, 0xB2),
        alloc=255,
        dev={"caps": Caps(flush=True)},
        data=bytes((0, 0xB2, 0, 4, 0, 0, 0, 0)),
    ),
    # ---- MODE SENSE ------------------------------------------------------------------------
    Case(
        "mode sense (6), all pages with block descriptor",
        "SPC-4 MODE SENSE (6); SBC-3 mode parameter block descriptor",
        mode_sense6(0x3F),
        alloc=255,
        data=lambda d: d[0] == len(d) - 1
        and d[1] == 0  # medium type
        and d[2] == 0x10  # DPOFUA, not write protected
        and d[3] == 8
        and d[4:12] == be(128, 4) + b"\0" + be(512, 3)
        and [d[i] for i in (12, 24, 44, 56)] == [0x01, 0x08, 0x0A, 0x1C]
        and [d[i] for i in (13, 25, 45, 57)] == [0x0A, 0x12, 0x0A, 0x0A]
        and len(d) == 68,
    ),
    Case(
        "mode sense (6), caching page reflects the write cache",
        "SBC-3 Caching mode page: WCE",
        mode_sense6(0x08, dbd=True),
        alloc=255,
        dev={"write_cache": True},
        data=lambda d: d[3] == 0 and d[4:6] == b"\x08\x12" and d[6] & 0x04 == 0x04,
    ),
    Case(
        "mode sense (6), caching page without a write cache",
        "SBC-3 Caching mode page: WCE",
        mode_sense6(0x08, dbd=True),
        alloc=255,
        data=lambda d: d[6] & 0x04 == 0,
    ),
    Case(
        "mode sense (6), write protected",
        "SBC-3 device-specific parameter: WP",
        mode_sense6(0x3F, dbd=True),
        alloc=255,
        dev={"caps": Caps(readonly=True)},
        data=lambda d: d[2] & 0x80 == 0x80,
    ),
    Case(
        "mode sense (6), allocation length truncates, length field does not",
        "SPC-4 ALLOCATION LENGTH field",
        mode_sense6(0x3F, alloc=4),
        alloc=4,
        data=lambda d: len(d) == 4 and d[0] == 67,
    ),
    Case(
        "mode sense (10), long LBA block descriptor",
        "SPC-4 MODE SENSE (10) LLBAA; SBC-3 long LBA block descriptor",
        mode_sense10(0x0A, llbaa=True),
        alloc=1024,
        data=lambda d: d[0:2] == be(len(d) - 2, 2)
        and d[4] & 0x01 == 1  # LONGLBA
        and d[6:8] == be(16, 2)
        and d[8:24] == be(128, 8) + bytes(4) + be(512, 4)
        and d[24:26] == b"\x0a\x0a",
    ),
    Case(
        "mode sense (10), no block descriptor",
        "SPC-4 MODE SENSE (10) DBD",
        mode_sense10(0x01, dbd=True),
        alloc=1024,
        data=lambda d: d[0:2] == be(18, 2) and d[6:8] == b"\0\0" and d[8:10] == b"\x01\x0a",
    ),
    Case(
        "mode sense, changeable values of the control page",
        "SPC-4 MODE SENSE PC=01b; Control mode page D_SENSE",
        mode_sense6(0x0A, pc=1, dbd=True),
        alloc=255,
        data=lambda d: d[4:6] == b"\x0a\x0a" and d[6] == 0x04 and d[7:16] == bytes(9),
    ),
    Case(
        "mode sense, saved values",
        "SPC-4 MODE SENSE PC=11b: SAVING PARAMETERS NOT SUPPORTED",
        mode_sense6(0x08, pc=3),
        CC,
        (ILLEGAL, 0x39, 0x00),
        alloc=255,
    ),
    Case(
        "mode sense, unknown page",
        "SPC-4 MODE SENSE: unsupported page code",
        mode_sense6(0x19),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=255,
        field=(2, 5, True),
    ),
    Case(
        "mode sense, all pages with a subpage code",
        "SPC-4 MODE SENSE: subpage 00h or FFh only with page 3Fh",
        mode_sense6(0x3F, sub=0x05),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=255,
    ),
    Case(
        "mode sense, all pages and subpages",
        "SPC-4 MODE SENSE page 3Fh subpage FFh",
        mode_sense6(0x3F, sub=0xFF, dbd=True),
        alloc=255,
        data=lambda d: d[4] == 0x01,
    ),
    # ---- MODE SELECT -----------------------------------------------------------------------
    Case("mode select, empty list", "SPC-4 MODE SELECT: length 0 is no data", mode_select6(0)),
    Case(
        "mode select, PF=0",
        "SPC-4 MODE SELECT: vendor-specific page format refused",
        mode_select6(16, pf=False),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=bytes(16),
        field=(1, 4, True),
    ),
    Case(
        "mode select, SP=1",
        "SPC-4 MODE SELECT: saving pages not supported",
        mode_select10(20, sp=True),
        CC,
        (ILLEGAL, 0x24, 0x00),
        data_out=bytes(20),
    ),
    Case(
        "mode select, list shorter than its header",
        "SPC-4 MODE SELECT: PARAMETER LIST LENGTH ERROR",
        mode_select6(2),
        CC,
        (ILLEGAL, 0x1A, 0x00),
        data_out=bytes(2),
    ),
    Case(
        "mode select, unknown page",
        "SPC-4 MODE SELECT: INVALID FIELD IN PARAMETER LIST",
        mode_select6(16),
        CC,
        (ILLEGAL, 0x26, 0x00),
        data_out=bytes(4) + bytes((0x19, 10)) + bytes(10),
    ),
    Case(
        "mode select, medium type",
        "SBC-3 mode parameter header: MEDIUM TYPE 00h",
        mode_select6(4),
        CC,
        (ILLEGAL, 0x26, 0x00),
        data_out=bytes((0, 0x01, 0, 0)),
    ),
    Case(
        "mode select, subpage format",
        "SPC-4 MODE SELECT: no subpages are implemented",
        mode_select6(8),
        CC,
        (ILLEGAL, 0x26, 0x00),
        data_out=bytes(4) + bytes((0x4A, 0x01, 0, 0)),
    ),
    Case(
        "mode select, wrong page length",
        "SPC-4 MODE SELECT: PAGE LENGTH must match",
        mode_select6(14),
        CC,
        (ILLEGAL, 0x26, 0x00),
        data_out=bytes(4) + bytes((0x0A, 8)) + bytes(8),
    ),
    # ---- REPORT SUPPORTED OPERATION CODES --------------------------------------------------
    Case(
        "rsoc, one command: READ (10)",
        "SPC-4 RSOC one_command format: SUPPORT 011b, CDB SIZE, usage map",
        maint_in(0x0C, 64, b2=0x01, b3=0x28),
        alloc=64,
        data=lambda d: d[1] & 0x07 == 0b011 and d[2:4] == be(10, 2) and d[4] == 0x28
        and d[6:10] == b"\xff" * 4 and d[11:13] == b"\xff\xff" and len(d) == 14,
    ),
    Case(
        "rsoc, one command: not supported",
        "SPC-4 RSOC one_command: SUPPORT 001b",
        maint_in(0x0C, 64, b2=0x01, b3=0xC0),
        alloc=64,
        data=lambda d: d[1] & 0x07 == 0b001,
    ),
    Case(
        "rsoc, one command by opcode for a service-action opcode",
        "SPC-4 RSOC REPORTING OPTIONS 001b",
        maint_in(0x0C, 64, b2=0x01, b3=0x9E),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=64,
    ),
    Case(
        "rsoc, opcode and service action for a plain opcode",
        "SPC-4 RSOC REPORTING OPTIONS 010b",
        maint_in(0x0C, 64, b2=0x02, b3=0x28),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=64,
    ),
    Case(
        "rsoc, READ CAPACITY (16) by opcode and service action",
        "SPC-4 RSOC REPORTING OPTIONS 010b",
        maint_in(0x0C, 64, b2=0x02, b3=0x9E, b45=0x10),
        alloc=64,
        data=lambda d: d[1] & 0x07 == 0b011 and d[2:4] == be(16, 2) and d[4:6] == b"\x9e\x1f",
    ),
    Case(
        "rsoc, with command timeouts descriptor",
        "SPC-4 RSOC RCTD=1: CTDP and a 12-byte timeouts descriptor",
        maint_in(0x0C, 64, b2=0x81, b3=0x00),
        alloc=64,
        data=lambda d: d[1] & 0x80 == 0x80 and len(d) == 4 + 6 + 12 and d[10:12] == be(10, 2),
    ),
    Case(
        "rsoc, option 011b for a plain opcode and service action 0",
        "SPC-4 RSOC REPORTING OPTIONS 011b",
        maint_in(0x0C, 64, b2=0x03, b3=0x2A),
        alloc=64,
        data=lambda d: d[1] & 0x07 == 0b011 and d[4] == 0x2A,
    ),
    Case(
        "rsoc, option 011b for a service action",
        "SPC-4 RSOC REPORTING OPTIONS 011b",
        maint_in(0x0C, 64, b2=0x03, b3=0xA3, b45=0x0A),
        alloc=64,
        data=lambda d: d[1] & 0x07 == 0b011 and d[2:4] == be(12, 2) and d[4] == 0xA3,
    ),
    Case(
        "rsoc, option 011b for an unserved service action",
        "SPC-4 RSOC REPORTING OPTIONS 011b",
        maint_in(0x0C, 64, b2=0x03, b3=0x9E, b45=0x13),
        alloc=64,
        data=lambda d: d[1] & 0x07 == 0b001,
    ),
    Case(
        "rsoc, reserved reporting options",
        "SPC-4 RSOC REPORTING OPTIONS",
        maint_in(0x0C, 64, b2=0x05),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=64,
    ),
    # ---- REPORT TARGET PORT GROUPS ---------------------------------------------------------
    Case(
        "rtpg, reserved parameter data format",
        "SPC-4 REPORT TARGET PORT GROUPS: PARAMETER DATA FORMAT",
        maint_in(0x4A, 255),
        CC,
        (ILLEGAL, 0x24, 0x00),
        alloc=255,
    ),
    Case(
        "rtpg, no groups",
        "SPC-4 REPORT TARGET PORT GROUPS: length-only header",
        maint_in(0x0A, 255),
        alloc=255,
        data=bytes(4),
    ),
]


@pytest.mark.parametrize("case", SPC_CASES, ids=lambda c: c.name)
def test_spc_command_table(case, scsi_device, scsi_run):
    check(case, scsi_device, scsi_run)


# ---- sequences -----------------------------------------------------------------------------


def _all_commands(data: bytes) -> set[tuple[int, int | None]]:
    """Parse the RSOC all_commands format into (opcode, service action or None)."""
    n = int.from_bytes(data[0:4], "big")
    out, pos = set(), 4
    while pos < 4 + n:
        op, sa, flags = data[pos], int.from_bytes(data[pos + 2 : pos + 4], "big"), data[pos + 5]
        out.add((op, sa if flags & 0x01 else None))
        pos += 20 if flags & 0x02 else 8
    return out


def test_rsoc_lists_what_is_served(scsi_device, scsi_run):
    full = _all_commands(scsi_run(scsi_device(), maint_in(0x0C, 4096), alloc_len=4096).data)
    for cmd in [(0x00, None), (0x12, None), (0x28, None), (0x2A, None), (0x42, None),
                (0x89, None), (0x9E, 0x10), (0x9E, 0x12), (0xA3, 0x0A), (0xA3, 0x0C),
                (0x83, 0x00), (0x84, 0x03), (0x04, None), (0x2F, None), (0x93, None)]:
        assert cmd in full
    assert (0xA4, 0x0A) not in full  # SET TARGET PORT GROUPS: explicit ALUA only
    bare = _all_commands(
        scsi_run(scsi_device(caps=Caps()), maint_in(0x0C, 4096), alloc_len=4096).data
    )
    assert (0x42, None) not in bare and (0x9E, 0x12) not in bare
    assert (0x28, None) in bare and (0x35, None) in bare


def test_rsoc_length_field_counts_every_descriptor(scsi_device, scsi_run):
    data = scsi_run(scsi_device(), maint_in(0x0C, 8192), alloc_len=8192).data
    assert int.from_bytes(data[0:4], "big") == len(data) - 4
    assert (len(data) - 4) % 8 == 0


def test_rtpg_reports_the_groups_of_the_control_plane(scsi_device, scsi_run):
    groups = [
        AluaGroup(1, 0x0, preferred=True, rel_port_ids=(1,)),
        AluaGroup(2, 0x1, rel_port_ids=(2, 3)),
    ]
    dev = scsi_device(alua_groups=groups, alua_implicit=True)
    res = scsi_run(dev, maint_in(0x2A, 255), alloc_len=255)  # extended header
    g1 = bytes((0x80, 0x0F, 0, 1, 0, 0, 0, 1)) + be(1, 4)
    g2 = bytes((0x01, 0x0F, 0, 2, 0, 0, 0, 2)) + be(2, 4) + be(3, 4)
    assert res.data == be(32, 4) + bytes((0x10, 0, 0, 0)) + g1 + g2
    res = scsi_run(dev, maint_in(0x0A, 255), alloc_len=255)  # length-only header
    assert res.data == be(28, 4) + g1 + g2


def test_stpg_with_explicit_alua_changes_the_group_state(scsi_device, scsi_run):
    groups = [AluaGroup(1, 0x0), AluaGroup(2, 0x1)]
    dev = scsi_device(alua_groups=groups, alua_explicit=True)
    params = bytes(4) + bytes((0x02, 0, 0, 2))  # group 2 -> Standby
    assert scsi_run(dev, maint_out(0x0A, len(params)), params).status == 0
    assert groups[1].state == 0x2
    unknown = bytes(4) + bytes((0x00, 0, 0, 9))
    res = scsi_run(dev, maint_out(0x0A, len(unknown)), unknown)
    s = decode_sense(res.sense)
    assert res.status == CC and (s.key, s.asc) == (ILLEGAL, 0x26)
    transitioning = bytes(4) + bytes((0x0F, 0, 0, 1))
    assert scsi_run(dev, maint_out(0x0A, 8), transitioning).status == CC
    assert groups[0].state == 0x0


def test_mode_select_sets_descriptor_sense(scsi_device, scsi_run):
    """SPC-4 Control mode page D_SENSE=1: sense data in descriptor format from now on."""
    dev = scsi_device()
    cur = scsi_run(dev, mode_sense6(0x0A, dbd=True), alloc_len=255).data
    page = bytearray(cur[4:16])
    page[2] |= 0x04
    params = bytes(4) + bytes(page)
    assert scsi_run(dev, mode_select6(len(params)), params).status == 0
    after = scsi_run(dev, mode_sense6(0x0A, dbd=True), alloc_len=255).data
    assert after[6] & 0x04
    res = scsi_run(dev, rw10(0x28, 1000, 1), alloc_len=512)
    assert res.status == CC and res.sense[0] == 0x72
    assert decode_sense(res.sense)[:3] == (ILLEGAL, 0x21, 0x00)


def test_mode_select_refuses_changes_to_unchangeable_bits(scsi_device, scsi_run):
    """SPC-4 MODE SELECT: a non-changeable field set to another value is an error."""
    dev = scsi_device()
    cur = scsi_run(dev, mode_sense10(0x08, dbd=True), alloc_len=255).data
    page = bytearray(cur[8:28])
    page[2] |= 0x04  # WCE
    params = bytes(8) + bytes(page)
    res = scsi_run(dev, mode_select10(len(params)), params)
    s = decode_sense(res.sense)
    assert res.status == CC and (s.key, s.asc, s.ascq) == (ILLEGAL, 0x26, 0x00)
    assert s.field == (8 + 2, None, False)
    # resending the current values unchanged is accepted
    params = bytes(8) + cur[8:28]
    assert scsi_run(dev, mode_select10(len(params)), params).status == 0


def test_mode_select_accepts_the_block_descriptor_it_reported(scsi_device, scsi_run):
    dev = scsi_device()
    cur = scsi_run(dev, mode_sense6(0x01), alloc_len=255).data
    params = bytes((0, 0, 0, 8)) + cur[4:12] + cur[12:24]
    assert scsi_run(dev, mode_select6(len(params)), params).status == 0
    bad = bytearray(params)
    bad[9:12] = be(4096, 3)  # another LOGICAL BLOCK LENGTH
    res = scsi_run(dev, mode_select6(len(bad)), bytes(bad))
    assert res.status == CC and decode_sense(res.sense).asc == 0x26


# ---- unit attentions -------------------------------------------------------------------------


def test_unit_attention_is_reported_once_then_cleared(scsi_device, scsi_run):
    """SAM-5 unit attention condition: the next command gets CHECK CONDITION / UNIT ATTENTION."""
    dev = scsi_device()
    add_unit_attention(dev.state, 0x2A, 0x09)  # CAPACITY DATA HAS CHANGED
    res = scsi_run(dev, cdb6(0x00))
    assert res.status == CC and decode_sense(res.sense)[:3] == (UA, 0x2A, 0x09)
    assert scsi_run(dev, cdb6(0x00)).status == 0


def test_inquiry_does_not_report_a_unit_attention(scsi_device, scsi_run):
    dev = scsi_device()
    add_unit_attention(dev.state, 0x29, 0x00)
    assert scsi_run(dev, inquiry(), alloc_len=255).status == 0
    res = scsi_run(dev, rw10(0x28, 0, 1), alloc_len=512)
    assert res.status == CC and decode_sense(res.sense)[:3] == (UA, 0x29, 0x00)


def test_request_sense_reports_and_clears_a_unit_attention(scsi_device, scsi_run):
    """SPC-4 REQUEST SENSE: returns the pending unit attention with GOOD status."""
    dev = scsi_device()
    add_unit_attention(dev.state, 0x2A, 0x09)
    res = scsi_run(dev, cdb6(0x03, b4=252), alloc_len=252)
    assert res.status == 0 and decode_sense(res.data)[:3] == (UA, 0x2A, 0x09)
    assert scsi_run(dev, cdb6(0x00)).status == 0


def test_unit_attention_even_for_an_unserved_opcode(scsi_device, scsi_run):
    dev = scsi_device()
    add_unit_attention(dev.state, 0x29, 0x00)
    res = scsi_run(dev, bytes((0xC0,)) + bytes(9))
    assert decode_sense(res.sense)[:3] == (UA, 0x29, 0x00)


def test_reset_unit_attention_comes_first(scsi_device, scsi_run):
    dev = scsi_device()
    add_unit_attention(dev.state, 0x2A, 0x09)
    add_unit_attention(dev.state, 0x29, 0x00)
    res = scsi_run(dev, cdb6(0x00))
    assert decode_sense(res.sense)[:3] == (UA, 0x29, 0x00)


# ---- logging ---------------------------------------------------------------------------------


def test_unserved_opcode_is_logged_once_per_opcode_per_device(scsi_device, scsi_run, caplog):
    caplog.set_level(logging.INFO, logger="tcmu_py.scsi")
    a, b = scsi_device(name="a"), scsi_device(name="b")
    for _ in range(5):
        scsi_run(a, bytes((0xC0,)) + bytes(9))
        scsi_run(a, maint_in(0x05, 16), alloc_len=16)
    scsi_run(a, bytes((0xC1,)) + bytes(9))
    scsi_run(b, bytes((0xC0,)) + bytes(9))
    records = [r for r in caplog.records if r.name == "tcmu_py.scsi"]
    assert len(records) == 4


def test_served_command_is_not_logged(scsi_device, scsi_run, caplog):
    caplog.set_level(logging.DEBUG, logger="tcmu_py.scsi")
    dev = scsi_device()
    for _ in range(3):
        scsi_run(dev, rw10(0x28, 0, 1), alloc_len=512)
        scsi_run(dev, rw10(0x28, 500, 1), alloc_len=512)  # an error, but a served command
    assert not [r for r in caplog.records if r.name == "tcmu_py.scsi"]
