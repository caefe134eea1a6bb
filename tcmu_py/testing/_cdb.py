"""CDBs and answers, as an initiator spells them: the vocabulary of the conformance suite.

Tests should read like a specification, so they build commands by name
(``cdb.write16(lba, n, fua=True)``) and check answers by name
(``expect_sense(res, SenseKey.ILLEGAL_REQUEST, 0x21)``) instead of by byte soup.  The
builders are independent of the SCSI layer on purpose: they encode what SBC-4 says,
so a mistake in ``tcmu_py.scsi`` cannot hide behind the same mistake here.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from tcmu_py.scsi._model import SenseKey
from tcmu_py.sim import SimResult

__all__ = [
    "Capacity",
    "Sense",
    "compare_and_write",
    "expect_data",
    "expect_good",
    "expect_sense",
    "inquiry",
    "mode_sense10",
    "read10",
    "read16",
    "read_capacity16",
    "synchronize_cache10",
    "synchronize_cache16",
    "unmap",
    "write10",
    "write16",
    "write_same10",
    "write_same16",
]

_RW10 = struct.Struct(">BBIBHB")
_RW16 = struct.Struct(">BBQIBB")
_FUA = 0x08  # SBC-4 5.8/5.45: byte 1 bit 3 of READ/WRITE (10)/(16), COMPARE AND WRITE


def read10(lba: int, n: int, *, fua: bool = False) -> bytes:
    """READ (10), SBC-4 5.16."""
    return _RW10.pack(0x28, _FUA if fua else 0, lba, 0, n, 0)


def read16(lba: int, n: int, *, fua: bool = False) -> bytes:
    """READ (16), SBC-4 5.18."""
    return _RW16.pack(0x88, _FUA if fua else 0, lba, n, 0, 0)


def write10(lba: int, n: int, *, fua: bool = False) -> bytes:
    """WRITE (10), SBC-4 5.40."""
    return _RW10.pack(0x2A, _FUA if fua else 0, lba, 0, n, 0)


def write16(lba: int, n: int, *, fua: bool = False) -> bytes:
    """WRITE (16), SBC-4 5.42."""
    return _RW16.pack(0x8A, _FUA if fua else 0, lba, n, 0, 0)


def synchronize_cache10(lba: int = 0, n: int = 0) -> bytes:
    """SYNCHRONIZE CACHE (10), SBC-4 5.32; ``n`` 0 means to the end of the medium."""
    return _RW10.pack(0x35, 0, lba, 0, n, 0)


def synchronize_cache16(lba: int = 0, n: int = 0) -> bytes:
    """SYNCHRONIZE CACHE (16), SBC-4 5.33."""
    return _RW16.pack(0x91, 0, lba, n, 0, 0)


def write_same10(lba: int, n: int, *, unmap: bool = False) -> bytes:
    """WRITE SAME (10), SBC-4 5.48; the Data-Out buffer is one block."""
    return _RW10.pack(0x41, 0x08 if unmap else 0, lba, 0, n, 0)


def write_same16(lba: int, n: int, *, unmap: bool = False, ndob: bool = False) -> bytes:
    """WRITE SAME (16), SBC-4 5.50; with NDOB there is no Data-Out buffer (zeroes)."""
    flags = (0x08 if unmap else 0) | (0x01 if ndob else 0)
    return _RW16.pack(0x93, flags, lba, n, 0, 0)


def compare_and_write(lba: int, n: int = 1, *, fua: bool = False) -> bytes:
    """COMPARE AND WRITE, SBC-4 5.3; the Data-Out buffer is the verify blocks, then
    the write blocks (2 * n blocks)."""
    return struct.pack(">BBQ3xB2x", 0x89, _FUA if fua else 0, lba, n)


def unmap(ranges: Iterable[tuple[int, int]]) -> tuple[bytes, bytes]:
    """UNMAP, SBC-4 5.37: the CDB and its parameter list for ``(lba, blocks)`` ranges."""
    descs = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    params = struct.pack(">HH4x", 6 + len(descs), len(descs)) + descs
    cdb = struct.pack(">B5xBHB", 0x42, 0, len(params), 0)
    return cdb, params


def read_capacity16(alloc: int = 32) -> bytes:
    """READ CAPACITY (16), SBC-4 5.20 (SERVICE ACTION IN (16), service action 10h)."""
    return struct.pack(">BBQIBB", 0x9E, 0x10, 0, alloc, 0, 0)


def inquiry(alloc: int = 96, *, page: int | None = None) -> bytes:
    """INQUIRY, SPC-4 6.6: standard data, or the VPD ``page`` (EVPD=1)."""
    evpd, code = (0, 0) if page is None else (1, page)
    return struct.pack(">BBBHB", 0x12, evpd, code, alloc, 0)


def mode_sense10(page: int = 0x3F, alloc: int = 0xFFFF) -> bytes:
    """MODE SENSE (10), SPC-4 6.14, current values, block descriptors disabled."""
    return struct.pack(">BBBB3xHB", 0x5A, 0x08, page & 0x3F, 0, alloc, 0)


# ---- decoding answers ------------------------------------------------------------------


@dataclass(frozen=True)
class Sense:
    """Sense data decoded from either format (SPC-4 4.5.2 descriptor, 4.5.3 fixed)."""

    key: int
    asc: int
    ascq: int
    #: The INFORMATION field, or None when the sense does not carry a valid one.
    info: int | None

    @classmethod
    def parse(cls, raw: bytes) -> Sense:
        if len(raw) < 8:
            raise ValueError(f"sense data too short ({len(raw)} bytes): {raw.hex()}")
        code = raw[0] & 0x7F
        if code in (0x72, 0x73):  # descriptor format
            info = None
            pos, end = 8, min(len(raw), 8 + raw[7])
            while pos + 2 <= end:
                dtype, dlen = raw[pos], raw[pos + 1]
                if dtype == 0x00 and dlen == 0x0A and raw[pos + 2] & 0x80:
                    info = int.from_bytes(raw[pos + 4 : pos + 12], "big")
                pos += 2 + dlen
            return cls(raw[1] & 0x0F, raw[2], raw[3], info)
        if code in (0x70, 0x71) and len(raw) >= 14:  # fixed format
            valid = bool(raw[0] & 0x80)
            info = int.from_bytes(raw[3:7], "big") if valid else None
            return cls(raw[2] & 0x0F, raw[12], raw[13], info)
        raise ValueError(f"unknown sense data response code {raw[0]:#04x}: {raw.hex()}")

    def __str__(self) -> str:
        try:
            key = SenseKey(self.key).name
        except ValueError:
            key = f"{self.key:#x}"
        info = "" if self.info is None else f", INFORMATION {self.info}"
        return f"{key} {self.asc:02X}h/{self.ascq:02X}h{info}"


@dataclass(frozen=True)
class Capacity:
    """READ CAPACITY (16) parameter data, SBC-4 5.20.2."""

    num_lbas: int
    block_size: int
    #: Logical block provisioning management enabled: the device can UNMAP.
    lbpme: bool
    #: Unmapped blocks read back as zeroes.
    lbprz: bool

    @classmethod
    def parse(cls, data: bytes) -> Capacity:
        last, bs = struct.unpack_from(">QI", data)
        return cls(last + 1, bs, bool(data[14] & 0x80), bool(data[14] & 0x40))


def _describe(res: SimResult) -> str:
    if res.status == 0:
        return "GOOD"
    if res.sense:
        try:
            return f"status {res.status:#04x}, sense {Sense.parse(res.sense)}"
        except ValueError as e:
            return f"status {res.status:#04x}, {e}"
    return f"status {res.status:#04x} without sense"


def expect_good(res: SimResult, what: str) -> None:
    """Fail with the decoded sense unless ``res`` is GOOD."""
    if res.status != 0:
        raise AssertionError(f"{what}: expected GOOD, got {_describe(res)}")


def expect_sense(
    res: SimResult, key: int, asc: int, ascq: int = 0, *, what: str, info: int | None = None
) -> Sense:
    """Fail unless ``res`` is CHECK CONDITION with this sense (and INFORMATION, if given)."""
    want = Sense(key, asc, ascq, info)
    if res.status != 0x02 or not res.sense:
        raise AssertionError(f"{what}: expected CHECK CONDITION, {want}; got {_describe(res)}")
    got = Sense.parse(res.sense)
    if (got.key, got.asc, got.ascq) != (key, asc, ascq) or (info is not None and got.info != info):
        raise AssertionError(f"{what}: expected {want}; got {got}")
    return got


def expect_data(got: bytes, want: bytes, *, lba: int, block_size: int, what: str) -> None:
    """Fail naming the first differing block and byte, not with a multi-megabyte repr."""
    if got == want:
        return
    if len(got) != len(want):
        raise AssertionError(f"{what}: {len(got)} bytes came back, expected {len(want)}")
    first = next(i for i in range(len(want)) if got[i] != want[i])
    block, byte = divmod(first, block_size)
    raise AssertionError(
        f"{what}: data differs first at LBA {lba + block} byte {byte} "
        f"(got {got[first]:#04x}, expected {want[first]:#04x})"
    )
