"""MODE SENSE (6)/(10) and MODE SELECT (6)/(10) over a literal table of mode pages
(SPC-4 MODE SELECT/SENSE and mode parameters; SBC-3 mode parameters).

Pages and which of their bits an initiator may change are data, not code.  A MODE
SELECT may change only those bits; everything else must equal the current value
(what tcmu-runner and LIO demand of every bit).  Changes live in
``DeviceState.mode_overrides``; nothing is saved (PC=11b and SP=1 are refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ._common import Op, bad_cdb, bad_param, data_in, param_length_error, param_list
from ._model import GOOD, DeviceState, Outcome
from ._sense import Status, fail


class ModePage(NamedTuple):
    name: str
    default: bytes  # the whole page, header included, as the default (PC=10b) values
    changeable: dict[int, int]  # byte -> mask of the bits MODE SELECT may change


PAGES: dict[int, ModePage] = {
    # SBC-3 Read-Write Error Recovery mode page: nothing to recover, nothing to tune.
    0x01: ModePage("Read-Write Error Recovery", bytes.fromhex("010a" + "00" * 10), {}),
    # SBC-3 Caching mode page: WCE (byte 2 bit 2) is filled in from the device; DRA (byte 12 bit 5):
    # no read-ahead.  WCE is not changeable: the backend's cache is what it is.
    0x08: ModePage("Caching", bytes.fromhex("0812" + "00" * 10 + "20" + "00" * 7), {}),
    # SPC-4 Control mode page: GLTSD; QUEUE ALGORITHM MODIFIER 1 (unrestricted reordering); TAS (the
    # kernel completes aborted tasks); BUSY TIMEOUT PERIOD unlimited.  D_SENSE (byte 2
    # bit 2) is changeable and selects descriptor-format sense for every error.
    0x0A: ModePage("Control", bytes.fromhex("0a0a02100040" + "0000ffff0000"), {2: 0x04}),
    # SPC-4 Informational Exceptions Control mode page: this device never reports
    # informational exceptions, so DEXCPT and MRIE may be set to anything (smartctl does).
    0x1C: ModePage(
        "Informational Exceptions Control", bytes.fromhex("1c0a" + "00" * 10), {2: 0x08, 3: 0x0F}
    ),
}

_PC_CURRENT, _PC_CHANGEABLE, _PC_DEFAULT, _PC_SAVED = range(4)


def _default(code: int, dev: DeviceState) -> bytearray:
    page = bytearray(PAGES[code].default)
    if code == 0x08 and dev.write_cache:
        page[2] |= 0x04  # WCE
    return page


def _current(code: int, dev: DeviceState) -> bytearray:
    page = _default(code, dev)
    for byte, mask in PAGES[code].changeable.items():
        if (code, byte) in dev.mode_overrides:
            page[byte] = (page[byte] & ~mask) | (dev.mode_overrides[(code, byte)] & mask)
    return page


def _changeable(code: int) -> bytearray:
    mp = PAGES[code]
    page = bytearray(len(mp.default))
    page[0:2] = mp.default[0:2]
    for byte, mask in mp.changeable.items():
        page[byte] = mask
    return page


def _block_descriptor(dev: DeviceState, long_lba: bool) -> bytes:
    """SBC-3 mode parameter block descriptors: the short (8-byte) or long LBA (16-byte) block descriptor."""
    if long_lba:
        return dev.num_lbas.to_bytes(8, "big") + bytes(4) + dev.block_size.to_bytes(4, "big")
    blocks = min(dev.num_lbas, 0xFFFFFFFF)
    return blocks.to_bytes(4, "big") + b"\0" + (dev.block_size & 0xFFFFFF).to_bytes(3, "big")


def mode_sense(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SPC-4 MODE SENSE (6) / (10)."""
    ten = cdb[0] == 0x5A
    alloc = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
    dbd = bool(cdb[1] & 0x08)
    llbaa = ten and bool(cdb[1] & 0x10)
    pc, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if pc == _PC_SAVED:
        raise fail(Status.SAVING_NOT_SUPPORTED, field=(2, 7, True))
    if code == 0x3F:
        if subpage not in (0x00, 0xFF):  # all pages, or all pages and subpages
            raise bad_cdb(3, 7)
        codes = sorted(PAGES)
    elif code in PAGES:
        if subpage:
            raise bad_cdb(3, 7)
        codes = [code]
    else:
        raise bad_cdb(2, 5)
    if pc == _PC_CHANGEABLE:
        pages = b"".join(_changeable(c) for c in codes)
    elif pc == _PC_DEFAULT:
        pages = b"".join(_default(c, dev) for c in codes)
    else:
        pages = b"".join(_current(c, dev) for c in codes)
    bd = b"" if dbd else _block_descriptor(dev, llbaa)
    # DEVICE-SPECIFIC PARAMETER (SBC-3 mode parameter header): WP, and DPOFUA since FUA is honoured.
    dsp = (0x80 if dev.caps.readonly else 0x00) | 0x10
    if ten:
        total = 8 + len(bd) + len(pages)
        hdr = (total - 2).to_bytes(2, "big") + bytes((0, dsp, 0x01 if llbaa and bd else 0, 0))
        hdr += len(bd).to_bytes(2, "big")
    else:
        total = 4 + len(bd) + len(pages)
        hdr = bytes((total - 1, 0, dsp, len(bd)))
    return data_in(hdr + bd + pages, alloc)


def mode_select(cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState) -> Outcome:
    """SPC-4 MODE SELECT (6) / (10): validate the whole list first, then apply it (all or nothing)."""
    ten = cdb[0] == 0x55
    declared = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
    if not cdb[1] & 0x10:
        raise bad_cdb(1, 4)  # PF=0: vendor-specific page format
    if cdb[1] & 0x01:
        raise bad_cdb(1, 0)  # SP=1: nothing can be saved
    if declared == 0:
        return GOOD
    data = param_list(iov, data_len, declared)
    hlen = 8 if ten else 4
    if declared < hlen:
        raise param_length_error("MODE SELECT header truncated")
    if data[1 if not ten else 2]:
        raise bad_param(1 if not ten else 2, 7)  # MEDIUM TYPE: 00h for SBC
    if ten:
        bdl, long_lba, bdl_at = int.from_bytes(data[6:8], "big"), bool(data[4] & 0x01), 6
    else:
        bdl, long_lba, bdl_at = data[3], False, 3
    if bdl not in (0, 16 if long_lba else 8):
        raise bad_param(bdl_at, 7)
    if hlen + bdl > declared:
        raise param_length_error("block descriptor truncated")
    if bdl:
        at = hlen + (12 if long_lba else 5)
        width = 4 if long_lba else 3
        if int.from_bytes(data[at : at + width], "big") != dev.block_size:
            raise bad_param(at, 7)  # LOGICAL BLOCK LENGTH cannot change
    pos, changes = hlen + bdl, []
    while pos < declared:
        if declared - pos < 2:
            raise param_length_error("mode page header truncated")
        code = data[pos] & 0x3F
        if data[pos] & 0x40:
            raise bad_param(pos, 6)  # SPF: no subpages here
        if code not in PAGES:
            raise bad_param(pos, 5)
        size = len(PAGES[code].default)
        if data[pos + 1] != size - 2:
            raise bad_param(pos + 1, 7)
        if pos + size > declared:
            raise param_length_error("mode page truncated")
        new, cur = data[pos : pos + size], _current(code, dev)
        for i in range(2, size):
            if (new[i] ^ cur[i]) & ~PAGES[code].changeable.get(i, 0) & 0xFF:
                raise bad_param(pos + i)  # not changeable
        changes.append((code, new))
        pos += size
    for code, new in changes:
        for byte, mask in PAGES[code].changeable.items():
            dev.mode_overrides[(code, byte)] = new[byte] & mask
    return GOOD


OPS: dict[int, Op] = {
    0x15: Op(mode_select, "MODE SELECT (6)", 6, bytes((0x15, 0x11, 0, 0, 0xFF, 0))),
    0x1A: Op(mode_sense, "MODE SENSE (6)", 6, bytes((0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0))),
    0x55: Op(mode_select, "MODE SELECT (10)", 10, bytes((0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0))),
    0x5A: Op(mode_sense, "MODE SENSE (10)", 10, bytes((0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0))),
}
