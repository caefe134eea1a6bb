"""INQUIRY: standard data and the vital product data pages 00h, 80h, 83h, 86h, B0h,
B1h and B2h (SPC-4 INQUIRY and VPD parameters, SBC-3 VPD parameters).

The identity is what multipath configs and udev rules already match on for
tcmu-runner: vendor ``LIO-ORG``, product ``TCMU device``, and an NAA designator derived
from the configfs unit serial exactly as LIO derives it (``reference/tcmu.md`` §2.7).
"""

from __future__ import annotations

from collections.abc import Sequence

from ._common import Op, bad_cdb, data_in, sa_key
from ._model import DeviceState, Outcome

VENDOR = b"LIO-ORG "
PRODUCT = b"TCMU device     "
REVISION = b"0002"
IEEE_OUI = 0x001405  # LIO's company id, so the NAA equals what LIO and tcmu-runner report

# Version descriptors (SPC-4 Table 152): SAM-5, SPC-4, SBC-3 (no revision claimed).
_VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0)

_HEX = {c: int(c, 16) for c in "0123456789abcdefABCDEF"}

# Supported VPD pages, ascending as SPC-4 (Supported VPD Pages) requires.
VPD_PAGES = (0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2)


def naa_from_serial(serial: str) -> bytes:
    """The 16-byte NAA IEEE Registered Extended designator LIO builds from a unit serial
    (``spc_gen_naa_6h_vendor_specific``): NAA 6, OUI 00-14-05, then the serial's hex
    digits (other characters skipped) as 25 nibbles, zero-padded."""
    out = bytearray(16)
    out[0] = 0x60 | (IEEE_OUI >> 20) & 0x0F
    out[1] = (IEEE_OUI >> 12) & 0xFF
    out[2] = (IEEE_OUI >> 4) & 0xFF
    out[3] = (IEEE_OUI & 0x0F) << 4
    pos, low = 3, True  # next nibble goes into the low half of out[pos]
    for ch in serial:
        if pos >= 16:
            break
        val = _HEX.get(ch)
        if val is None:  # like the kernel's hex_to_bin: ASCII hex digits only
            continue
        if low:
            out[pos] |= val
            pos += 1
        else:
            out[pos] = val << 4
        low = not low
    return bytes(out)


def naa_identifier(dev: DeviceState) -> bytes:
    """This device's NAA designator (what EXTENDED COPY target descriptors name)."""
    return naa_from_serial(dev.unit_serial)


def _standard(dev: DeviceState) -> bytes:
    """Standard INQUIRY data, SPC-4 (96 bytes: through the version descriptors)."""
    from . import _table  # the table lists this module: import it when first needed

    buf = bytearray(96)
    buf[0] = 0x00  # peripheral qualifier 0, direct access block device
    buf[2] = 0x06  # VERSION: SPC-4
    buf[3] = 0x02  # RESPONSE DATA FORMAT 2
    buf[4] = len(buf) - 5  # ADDITIONAL LENGTH
    tpgs = (0x10 if dev.alua_implicit else 0) | (0x20 if dev.alua_explicit else 0)
    threepc = 0x08 if _table.is_served(sa_key(0x83, 0x00), dev) else 0
    buf[5] = tpgs | threepc
    buf[7] = 0x02  # CMDQUE
    buf[8:16] = VENDOR
    buf[16:32] = PRODUCT
    buf[32:36] = REVISION
    for i, vd in enumerate(_VERSION_DESCRIPTORS):
        buf[58 + 2 * i : 60 + 2 * i] = vd.to_bytes(2, "big")
    return bytes(buf)


def _page(code: int, body: bytes | bytearray) -> bytes:
    """A VPD page: device type 0, page code, 2-byte PAGE LENGTH, body."""
    return bytes((0x00, code)) + len(body).to_bytes(2, "big") + bytes(body)


def _vpd_00(dev: DeviceState) -> bytes:
    return _page(0x00, bytes(VPD_PAGES))


def _vpd_80(dev: DeviceState) -> bytes:
    """Unit Serial Number VPD page (SPC-4): the configfs wwn/vpd_unit_serial, ASCII."""
    return _page(0x80, dev.unit_serial.encode("ascii", "replace")[:252])


def _designator(code_set: int, piv_assoc_type: int, value: bytes) -> bytes:
    """One designation descriptor (SPC-4 Device Identification VPD page); protocol
    identifier 0, PIV as given."""
    return bytes((code_set, piv_assoc_type, 0, len(value))) + value


def _vpd_83(dev: DeviceState) -> bytes:
    """Device Identification VPD page (SPC-4): NAA (logical unit), T10 vendor ID, and the
    relative target port and target port group when the control plane knows them."""
    body = bytearray()
    serial = dev.unit_serial.encode("ascii", "replace")[:200]
    if serial:  # NAA IEEE Registered Extended, binary, associated with the LU
        body += _designator(0x01, 0x03, naa_identifier(dev))
    body += _designator(0x02, 0x01, VENDOR + serial)  # T10 vendor ID, ASCII
    if dev.rel_port_id is not None:  # relative target port, association 01b
        body += _designator(0x01, 0x14, b"\0\0" + (dev.rel_port_id & 0xFFFF).to_bytes(2, "big"))
    if dev.local_group_id is not None:  # target port group, association 01b
        body += _designator(0x01, 0x15, b"\0\0" + (dev.local_group_id & 0xFFFF).to_bytes(2, "big"))
    return _page(0x83, body)


def _vpd_86(dev: DeviceState) -> bytes:
    """Extended INQUIRY Data VPD page (SPC-4): HEADSUP/ORDSUP/SIMPSUP (the kernel orders
    tasks before they reach us), V_SUP when there is a volatile write cache."""
    body = bytearray(60)
    body[1] = 0x07
    body[2] = 0x01 if dev.write_cache else 0x00
    return _page(0x86, body)


def _vpd_b0(dev: DeviceState) -> bytes:
    """Block Limits VPD page (SBC-3)."""
    body = bytearray(60)
    body[0] = 0x01  # WSNZ: WRITE SAME with zero blocks is refused
    body[1] = 0x01  # MAXIMUM COMPARE AND WRITE LENGTH
    body[4:8] = min(dev.max_xfer_len, 0xFFFFFFFF).to_bytes(4, "big")  # MAXIMUM TRANSFER LENGTH
    body[8:12] = min(dev.max_xfer_len, 0xFFFFFFFF).to_bytes(4, "big")  # OPTIMAL TRANSFER LENGTH
    if dev.caps.unmap:
        body[16:20] = min(dev.max_unmap_lbas, 0xFFFFFFFF).to_bytes(4, "big")
        body[20:24] = min(dev.max_unmap_descs, 0xFFFFFFFF).to_bytes(4, "big")
        body[24:28] = min(dev.unmap_granularity, 0xFFFFFFFF).to_bytes(4, "big")
        align = min(dev.unmap_alignment, 0x7FFFFFFF)
        body[28:32] = (0x80000000 | align).to_bytes(4, "big")  # UGAVALID
    body[32:40] = min(dev.max_write_same_lbas, 2**64 - 1).to_bytes(8, "big")
    return _page(0xB0, body)


def _vpd_b1(dev: DeviceState) -> bytes:
    """Block Device Characteristics VPD page (SBC-3): MEDIUM ROTATION RATE 1 = non-rotating."""
    body = bytearray(60)
    if dev.solid_state:
        body[0:2] = (1).to_bytes(2, "big")
    return _page(0xB1, body)


def _vpd_b2(dev: DeviceState) -> bytes:
    """Logical Block Provisioning VPD page (SBC-3): LBPU, LBPWS, LBPWS10 when the handler
    can unmap, LBPRZ when unmapped blocks read back zero; thin provisioned then."""
    body = bytearray(4)
    if dev.caps.unmap:
        body[1] = 0xE0 | (0x04 if dev.caps.lbprz else 0)
        body[2] = 0x02  # PROVISIONING TYPE: thin provisioned
    return _page(0xB2, body)


_VPD = {
    0x00: _vpd_00,
    0x80: _vpd_80,
    0x83: _vpd_83,
    0x86: _vpd_86,
    0xB0: _vpd_b0,
    0xB1: _vpd_b1,
    0xB2: _vpd_b2,
}
assert tuple(sorted(_VPD)) == VPD_PAGES


def inquiry(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SPC-4 INQUIRY."""
    alloc = int.from_bytes(cdb[3:5], "big")
    if cdb[1] & 0x02:
        raise bad_cdb(1, 1)  # CMDDT: obsolete, not supported
    if not cdb[1] & 0x01:
        if cdb[2]:
            raise bad_cdb(2, 7)  # PAGE CODE without EVPD
        return data_in(_standard(dev), alloc)
    page = _VPD.get(cdb[2])
    if page is None:
        raise bad_cdb(2, 7)
    return data_in(page(dev), alloc)


OPS: dict[int, Op] = {
    0x12: Op(inquiry, "INQUIRY", 6, bytes((0x12, 0x01, 0xFF, 0xFF, 0xFF, 0))),
}
