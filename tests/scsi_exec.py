"""A tiny in-memory "engine + handler" for the pure SCSI layer.

``MemDevice`` is a sparse block store (plus a deallocation map) behind a
``DeviceState``; ``execute(dev, cdb, data_out, alloc_len)`` runs ``scsi.dispatch`` and
services whatever it returns -- single requests, compound generators (with handler
failures thrown in as SenseError, as the engine does) and background jobs -- and gives
back ``(status, sense, data_in)`` the way an initiator would see them.

``decode_sense`` reads fixed or descriptor sense data, written from SPC-4 "Sense data" without
using the code under test.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tcmu_py import scsi
from tcmu_py.scsi import (
    Background,
    Caps,
    CompareAndWrite,
    DeviceState,
    Flush,
    GetLbaStatus,
    Read,
    Result,
    Sam,
    SenseError,
    SenseKey,
    Unmap,
    Write,
    WriteSame,
)

FULL_CAPS = Caps(flush=True, unmap=True, lbprz=True, get_lba_status=True)


class Response(NamedTuple):
    status: int
    sense: bytes
    data: bytes


@dataclass
class Fault:
    """Fail the next ``times`` requests of type ``kind`` (optionally: matching ``when``)."""

    kind: type
    error: SenseError | int  # a SenseError, or an errno the handler "raised"
    times: int = 1
    when: Callable[[Any], bool] | None = None


@dataclass
class MemDevice:
    """A RAM-backed device: what a handler would hold, plus a record of its calls.

    Storage is sparse (block -> bytes), so a device may be far larger than memory.
    """

    state: DeviceState
    blocks: dict[int, bytes] = field(default_factory=dict)
    deallocated: set[int] = field(default_factory=set)
    faults: list[Fault] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)
    background: list[Generator[Any, Any, Result]] = field(default_factory=list)
    background_results: list[Result] = field(default_factory=list)
    flushes: int = 0
    group: dict[int, MemDevice] = field(default_factory=dict)  # id(state) -> device

    @classmethod
    def make(
        cls,
        num_lbas: int = 128,
        block_size: int = 512,
        caps: Caps | None = None,
        *,
        name: str = "mem0",
        serial: str = "0123456789abcdef0123456789abcdef",
        **state: Any,
    ) -> MemDevice:
        st = DeviceState(
            name=name,
            cfgstring=f"mem/{name}",
            block_size=block_size,
            num_lbas=num_lbas,
            unit_serial=serial,
            caps=FULL_CAPS if caps is None else caps,
            **state,
        )
        dev = cls(st)
        dev.group[id(st)] = dev
        st.lookup_by_naa = dev._lookup
        return dev

    # -- direct access for tests ----------------------------------------------------------
    def read_blocks(self, lba: int, n: int) -> bytes:
        bs = self.state.block_size
        unmapped = bytes(bs) if self.state.caps.lbprz else b"\xff" * bs
        return b"".join(
            unmapped if b in self.deallocated else self.blocks.get(b, bytes(bs))
            for b in range(lba, lba + n)
        )

    def write_blocks(self, lba: int, data: bytes) -> None:
        bs = self.state.block_size
        assert len(data) % bs == 0
        for i in range(len(data) // bs):
            self.blocks[lba + i] = bytes(data[i * bs : (i + 1) * bs])
            self.deallocated.discard(lba + i)

    # -- a group of devices of one runner (EXTENDED COPY) -------------------------------
    def link(self, *others: MemDevice) -> None:
        group = self.group
        for o in others:
            group.update(o.group)
        for d in list(group.values()):
            d.group = group

    def _lookup(self, naa: bytes) -> DeviceState | None:
        for d in self.group.values():
            if d.state.unit_serial and scsi.naa_identifier(d.state) == naa:
                return d.state
        return None

    # -- failure injection --------------------------------------------------------------
    def fail(self, kind: type, error: SenseError | int, **kw: Any) -> None:
        self.faults.append(Fault(kind, error, **kw))

    def _maybe_fail(self, req: Any) -> None:
        for f in self.faults:
            if isinstance(req, f.kind) and f.times > 0 and (f.when is None or f.when(req)):
                f.times -= 1
                if isinstance(f.error, SenseError):
                    raise f.error
                writes = (Write, WriteSame, Unmap, CompareAndWrite)
                raise scsi.errno_to_sense(f.error, write=isinstance(req, writes))

    # -- the handler ----------------------------------------------------------------------
    def serve(self, req: Any) -> Any:
        """Run one I/O request on the device it names; returns what the engine send()s."""
        other = getattr(req, "dev", None)  # Background has no target device
        target = self if other is None else self.group[id(other)]
        self.requests.append(req)
        target._maybe_fail(req)
        return target._do(req)

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        bs = self.state.block_size
        assert offset % bs == 0 and length % bs == 0, "requests are block aligned"
        return offset // bs, length // bs

    def _do(self, req: Any) -> Any:
        t = type(req)
        if t is Read:
            data = self.read_blocks(*self._span(req.offset, req.length))
            if req.bufs is None:
                return data
            pos = 0
            for v in req.bufs:
                take = min(len(v), len(data) - pos)
                v[:take] = data[pos : pos + take]
                pos += take
            return None
        if t is Write:
            data = b"".join(bytes(b) for b in req.bufs)[: req.length]
            assert len(data) == req.length, "a Write carries all its data"
            self.write_blocks(self._span(req.offset, req.length)[0], data)
            if req.fua and not self.state.caps.fua and self.state.caps.flush:
                self.flushes += 1  # what the engine does for a FUA write
            return None
        if t is Flush:
            self.flushes += 1
            return None
        if t is Unmap:
            lba, n = self._span(req.offset, req.length)
            for b in range(lba, lba + n):
                self.blocks.pop(b, None)
                self.deallocated.add(b)
            return None
        if t is WriteSame:
            lba, n = self._span(req.offset, req.length)
            self.write_blocks(lba, req.pattern * n)
            return None
        if t is CompareAndWrite:
            lba, n = self._span(req.offset, len(req.compare))
            cur = self.read_blocks(lba, n)
            for i, (a, b) in enumerate(zip(cur, req.compare, strict=True)):
                if a != b:
                    raise SenseError(SenseKey.MISCOMPARE, 0x1D, 0x00, info=i)
            self.write_blocks(lba, bytes(req.write))
            return None
        if t is GetLbaStatus:
            bs = self.state.block_size
            first = req.offset // bs
            end = min(self.state.num_lbas, (req.offset + req.length) // bs)
            out: list[tuple[int, int, int]] = []
            cur = first
            runs: list[list[int]] = []
            for b in sorted(b for b in self.deallocated if first <= b < end):
                if runs and runs[-1][1] == b:
                    runs[-1][1] = b + 1
                else:
                    runs.append([b, b + 1])
            for a, z in runs:
                if a > cur:
                    out.append((cur * bs, (a - cur) * bs, 0))
                out.append((a * bs, (z - a) * bs, 1))
                cur = z
            if cur < end:
                out.append((cur * bs, (end - cur) * bs, 0))
            return out
        if t is Background:
            self.background.append(req.gen)
            return None
        raise TypeError(f"unknown request {req!r}")

    # -- compound commands ----------------------------------------------------------------
    def drive(self, gen: Generator[Any, Any, Result], steps: int | None = None) -> Result | None:
        """Run a generator (``steps`` requests at most); its Result, or None if unfinished."""
        value: Any = None
        exc: SenseError | None = None
        done = 0
        while steps is None or done < steps:
            try:
                req = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value if stop.value is not None else scsi.GOOD
            value, exc = None, None
            try:
                value = self.serve(req)
            except SenseError as err:
                exc = err
            done += 1
        return None

    def run_background(self, steps: int | None = None) -> None:
        """Advance every background job by ``steps`` requests (None: to completion)."""
        for gen in list(self.background):
            res = self.drive(gen, steps)
            if res is not None:
                self.background.remove(gen)
                self.background_results.append(res)

    def complete(self, out: Any) -> Result:
        """What the engine does with dispatch's answer."""
        if isinstance(out, Result):
            return out
        if isinstance(out, Generator):
            res = self.drive(out)
            assert res is not None
            return res
        try:
            self.serve(out)
        except SenseError as err:
            if err.status != Sam.CHECK_CONDITION:
                return Result(err.status)
            return Result(Sam.CHECK_CONDITION, scsi.sense_for(err))
        return scsi.GOOD


def execute(dev: MemDevice, cdb: bytes, data_out: bytes = b"", alloc_len: int = 0) -> Response:
    """Submit one command; ``alloc_len`` is the data-in buffer size when there is no
    data-out (the initiator's expected transfer length)."""
    if data_out:
        buf = bytearray(data_out)
        iov: Sequence[memoryview] = [memoryview(buf)]
    else:
        buf = bytearray(alloc_len)
        iov = [memoryview(buf)] if alloc_len else []
    out = scsi.dispatch(bytes(cdb), iov, len(buf), dev.state)
    res = dev.complete(out)
    if res.data is not None:
        data = bytes(res.data)[: len(buf)]
    elif type(out) is Read and res.status == Sam.GOOD:
        data = bytes(buf)
    else:
        data = b""
    return Response(int(res.status), bytes(res.sense), data)


# ---- reading sense data (SPC-4 "Sense data") -------------------------------------------------------


class Sense(NamedTuple):
    key: int
    asc: int
    ascq: int
    info: int | None  # INFORMATION, when VALID
    sks: bytes | None  # the 3 sense-key specific bytes, when SKSV
    deferred: bool

    @property
    def field(self) -> tuple[int, int | None, bool] | None:
        """Field pointer (byte, bit or None, in CDB) from the sense-key specific bytes."""
        if self.sks is None:
            return None
        b0 = self.sks[0]
        bit = b0 & 0x07 if b0 & 0x08 else None
        return int.from_bytes(self.sks[1:3], "big"), bit, bool(b0 & 0x40)

    @property
    def progress(self) -> int | None:
        return None if self.sks is None else int.from_bytes(self.sks[1:3], "big")


def decode_sense(sense: bytes) -> Sense:
    code = sense[0] & 0x7F
    if code in (0x70, 0x71):  # fixed format, 4.5.3
        assert len(sense) >= 18, "fixed-format sense is at least 18 bytes"
        info = int.from_bytes(sense[3:7], "big") if sense[0] & 0x80 else None
        sks = bytes(sense[15:18]) if sense[15] & 0x80 else None
        return Sense(sense[2] & 0x0F, sense[12], sense[13], info, sks, code == 0x71)
    assert code in (0x72, 0x73), f"unknown sense response code {code:#x}"
    info, sks = None, None
    pos, end = 8, 8 + sense[7]
    while pos + 2 <= end:
        kind, length = sense[pos], sense[pos + 1]
        if kind == 0x00 and sense[pos + 2] & 0x80:
            info = int.from_bytes(sense[pos + 4 : pos + 12], "big")
        elif kind == 0x02 and sense[pos + 4] & 0x80:
            sks = bytes(sense[pos + 4 : pos + 7])
        pos += 2 + length
    return Sense(sense[1] & 0x0F, sense[2], sense[3], info, sks, code == 0x73)


EIO = _errno.EIO


# ---- CDB builders, straight from the CDB layouts of SPC-4 / SBC-3 --------------------------


def be(value: int, width: int) -> bytes:
    return value.to_bytes(width, "big")


def cdb6(op: int, b1: int = 0, b2: int = 0, b3: int = 0, b4: int = 0) -> bytes:
    return bytes((op, b1, b2, b3, b4, 0))


def rw6(op: int, lba: int, n: int) -> bytes:
    """READ (6) / WRITE (6): 21-bit LBA, 8-bit TRANSFER LENGTH (SBC-3 READ (6), WRITE (6))."""
    return bytes((op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n & 0xFF, 0))


def rw10(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    """Any 10-byte LBA command: flags, LBA (2-5), group, length (7-8), control."""
    return bytes((op, flags)) + be(lba, 4) + b"\0" + be(n, 2) + b"\0"


def rw12(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + be(lba, 4) + be(n, 4) + b"\0\0"


def rw16(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + be(lba, 8) + be(n, 4) + b"\0\0"


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255, b1: int = 0) -> bytes:
    return bytes((0x12, evpd | b1, page)) + be(alloc, 2) + b"\0"


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, sub: int = 0, alloc: int = 255) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, pc << 6 | page, sub, alloc, 0))


def mode_sense10(
    page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, sub: int = 0, alloc: int = 1024
) -> bytes:
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return bytes((0x5A, b1, pc << 6 | page, sub, 0, 0, 0)) + be(alloc, 2) + b"\0"


def mode_select6(length: int, pf: bool = True, sp: bool = False) -> bytes:
    return bytes((0x15, (0x10 if pf else 0) | (0x01 if sp else 0), 0, 0, length, 0))


def mode_select10(length: int, pf: bool = True, sp: bool = False) -> bytes:
    b1 = (0x10 if pf else 0) | (0x01 if sp else 0)
    return bytes((0x55, b1, 0, 0, 0, 0, 0)) + be(length, 2) + b"\0"


def sa_in16(sa: int, alloc: int, lba: int = 0) -> bytes:
    """SERVICE ACTION IN (16): READ CAPACITY (16) 10h, GET LBA STATUS 12h."""
    return bytes((0x9E, sa)) + be(lba, 8) + be(alloc, 4) + b"\0\0"


def maint_in(sa: int, alloc: int, b2: int = 0, b3: int = 0, b45: int = 0) -> bytes:
    """MAINTENANCE IN (A3h): RTPG 0Ah, RSOC 0Ch."""
    return bytes((0xA3, sa, b2, b3)) + be(b45, 2) + be(alloc, 4) + b"\0\0"


def maint_out(sa: int, length: int) -> bytes:
    return bytes((0xA4, sa, 0, 0, 0, 0)) + be(length, 4) + b"\0\0"


def unmap_cdb(length: int, anchor: bool = False) -> bytes:
    return bytes((0x42, 0x01 if anchor else 0, 0, 0, 0, 0, 0)) + be(length, 2) + b"\0"


def unmap_params(*ranges: tuple[int, int]) -> bytes:
    """SBC-3 UNMAP parameter list: 8-byte header, then 16-byte block descriptors."""
    descs = b"".join(be(lba, 8) + be(n, 4) + bytes(4) for lba, n in ranges)
    return be(6 + len(descs), 2) + be(len(descs), 2) + bytes(4) + descs


def xcopy_cdb(length: int) -> bytes:
    """EXTENDED COPY (LID1) CDB, SPC-4."""
    return bytes((0x83, 0x00)) + bytes(8) + be(length, 4) + b"\0\0"


def id_target(naa: bytes, block_size: int = 512) -> bytes:
    """Identification descriptor CSCD descriptor E4h (SPC-4), 32 bytes."""
    designator = bytes((0x01, 0x03, 0x00, len(naa))) + naa
    body = bytes((0xE4, 0x00)) + b"\0\0" + designator
    body += bytes(28 - len(body))
    return body + b"\0" + be(block_size, 3)  # device type specific: DISK BLOCK LENGTH


def b2b_segment(src: int, dst: int, blocks: int, src_lba: int, dst_lba: int) -> bytes:
    """Block device to block device segment descriptor 02h (SPC-4), 28 bytes."""
    return (
        bytes((0x02, 0x00)) + be(0x18, 2) + be(src, 2) + be(dst, 2) + b"\0\0"
        + be(blocks, 2) + be(src_lba, 8) + be(dst_lba, 8)
    )


def xcopy_params(targets: list[bytes], segments: list[bytes], list_usage: int = 0b11) -> bytes:
    """SPC-4 EXTENDED COPY (LID1) parameter list header (16 bytes), descriptors follow."""
    t, s = b"".join(targets), b"".join(segments)
    return bytes((0x00, list_usage << 3)) + be(len(t), 2) + bytes(4) + be(len(s), 4) + bytes(4) + t + s


# ---- table cases -----------------------------------------------------------------------


class Case(NamedTuple):
    """One row of a CDB -> expected status/sense/data table."""

    name: str
    clause: str  # where the standard says so
    cdb: bytes
    status: int = Sam.GOOD
    sense: tuple[int, int, int] | None = None  # key, ASC, ASCQ
    data: bytes | Callable[[bytes], bool] | None = None
    data_out: bytes = b""
    alloc: int = 0
    dev: dict[str, Any] = {}  # kwargs of the device factory; never mutated
    field: tuple[int, int | None, bool] | None = None  # expected SKS field pointer


def check(case: Case, make: Callable[..., Any], run: Callable[..., Response]) -> Response:
    """Run ``case`` on a fresh device and assert what it expects."""
    dev = make(**case.dev)
    res = run(dev, case.cdb, case.data_out, case.alloc)
    assert res.status == case.status, (case.name, res)
    if case.sense is not None:
        s = decode_sense(res.sense)
        assert (s.key, s.asc, s.ascq) == case.sense, (case.name, s)
        if case.field is not None:
            assert s.field == case.field, (case.name, s.field)
    elif res.status == Sam.GOOD:
        assert res.sense == b""
    if callable(case.data):
        assert case.data(res.data), (case.name, res.data)
    elif case.data is not None:
        assert res.data == case.data, (case.name, res.data)
    return res


ILLEGAL = SenseKey.ILLEGAL_REQUEST
CC = Sam.CHECK_CONDITION
