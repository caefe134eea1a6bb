"""The userspace side of one TCMU command ring, over a real uio mapping or a simulated one.

A :class:`Ring` drains new entries through the native shim (one C call per batch), turns
each into a :class:`Command` whose data buffers are zero-copy memoryviews of the mapped
data area, and queues completions that :meth:`Ring.flush` writes at the shared tail with
one release-store and one 4-byte wakeup per batch (reference/tcmu.md §1.7-1.8).

Only the event-loop thread may touch a Ring (style.md §7).
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Any

from tcmu_py import _shim
from tcmu_py._shim import ffi, lib

__all__ = ["Command", "MalformedEntry", "Ring", "TmrEntry"]

# struct tcmu_py_desc, see native/tcmu_shim.h
_DESC = struct.Struct("<QQQIIIIHBBBB2x32s")
_IOV = struct.Struct("<QQ")
# struct tcmu_py_comp: read_len, cmd_id, status, uflags, sense_len, 7 pad, sense[96]
_COMP_HEAD = struct.Struct("<IHBBB")
_COMP_SIZE = 112
assert _DESC.size == _shim.DESC_SIZE and _IOV.size == _shim.IOV_SIZE
assert ffi.sizeof("struct tcmu_py_comp") == _COMP_SIZE

_MAX_DESCS = 1024
_MAX_IOVS = 16384
_MAX_TMR_IDS = 4096
_MAX_COMPS = 1024


class Command:
    """One SCSI command fetched from the ring.

    ``cdb`` is a private copy (the ring entry is overwritten by completions);
    ``iov`` holds memoryviews of the mapping -- the initiator's data, never copied.
    """

    __slots__ = ("bidi", "cdb", "cmd_id", "data_len", "iov", "state", "t_fetch")

    def __init__(self, cmd_id: int, cdb: bytes, iov: list[memoryview], data_len: int) -> None:
        self.cmd_id = cmd_id
        self.cdb = cdb
        self.iov = iov
        self.data_len = data_len
        self.bidi: list[memoryview] = []
        self.state = 0  # engine-owned: 0 running, 1 aborted
        self.t_fetch = 0.0

    def __repr__(self) -> str:
        return f"Command(id={self.cmd_id}, op={self.cdb[0]:#04x}, len={self.data_len})"


class TmrEntry:
    """A task-management notification (§1.5): the ids of aborted commands in the ring."""

    __slots__ = ("cmd_ids", "tmr_type")

    def __init__(self, tmr_type: int, cmd_ids: tuple[int, ...]) -> None:
        self.tmr_type = tmr_type
        self.cmd_ids = cmd_ids


class MalformedEntry:
    """A CMD entry the shim refused to decode; it must still be completed (UNKNOWN_OP)."""

    __slots__ = ("cmd_id", "reason")

    def __init__(self, cmd_id: int, reason: str) -> None:
        self.cmd_id = cmd_id
        self.reason = reason


class Ring:
    """One device's command ring: drain, complete, wake."""

    def __init__(self, fd: int, map_size: int, *, map_fd: int | None = None) -> None:
        """``fd`` carries the events (/dev/uioN); ``map_fd`` is mapped, default ``fd``.

        They differ only for the simulated kernel, whose memory is a memfd.
        """
        self.fd = fd
        self.map_size = map_size
        self._ptr = _shim.map_region(fd if map_fd is None else map_fd, map_size)
        self._r = ffi.new("struct tcmu_py_ring *")
        _shim.ring_init(self._r, self._ptr, map_size, fd)
        self.view = memoryview(ffi.buffer(self._ptr, map_size))
        self._descs = ffi.new("struct tcmu_py_desc[]", _MAX_DESCS)
        self._desc_buf = memoryview(ffi.buffer(self._descs))
        self._iovs = ffi.new("struct tcmu_py_iov[]", _MAX_IOVS)
        self._iov_buf = memoryview(ffi.buffer(self._iovs))
        self._tmr_ids = ffi.new("uint16_t[]", _MAX_TMR_IDS)
        self._comps = ffi.new("struct tcmu_py_comp[]", _MAX_COMPS)
        self._comp_buf = memoryview(ffi.buffer(self._comps))
        self._ncomp = 0
        self._completed_since_wakeup = False
        self._closed = False
        self.wakeups = 0  # 4-byte writes issued (one per batch)
        # the native data path (see attach_native); off until a handler lends memory
        self._fast = ffi.new("struct tcmu_py_fast *")
        self._fast_mem: Any = None  # the cffi buffer keeping the lent memory exported
        self._fails = ffi.new("struct tcmu_py_fail[]", _MAX_COMPS)
        self._fast_on = False
        self._native = False  # a medium (memory or fd) is attached
        self.native_efd = -1
        self.native_served = 0  # commands served by the native path, last drain

    # -- geometry ----------------------------------------------------------------------
    @property
    def cmdr_size(self) -> int:
        return int(self._r.cmdr_size)

    @property
    def data_off(self) -> int:
        return int(self._r.data_off)

    @property
    def corrupt(self) -> str | None:
        """Why the ring walk stopped for good (a reset_ring is needed), or None."""
        bad = int(self._r.corrupt)
        return _shim.BAD_REASONS.get(bad, "unknown") if bad else None

    @property
    def fetch(self) -> int:
        """Private consumer index: the next entry to drain."""
        return int(self._r.fetch)

    @property
    def head(self) -> int:
        return int(lib.tcmu_py_load_head(self._r))

    @property
    def tail(self) -> int:
        return int(lib.tcmu_py_load_tail(self._r))

    def inflight_bytes(self) -> int:
        return int(lib.tcmu_py_inflight_bytes(self._r))

    # -- events ------------------------------------------------------------------------
    def ack(self) -> int:
        """Consume pending kernel notifications (non-blocking)."""
        return _shim.ack(self.fd)

    def wait(self, timeout_ms: int) -> bool:
        """Block (GIL released) until the kernel notifies; for loops without asyncio."""
        return _shim.wait(self.fd, timeout_ms)

    # -- the native data path ------------------------------------------------------------
    def attach_native(self, mem: Any, block_size: int, num_lbas: int, max_xfer: int,
                      readonly: bool) -> bool:
        """Lend the device's memory (a writable buffer of the whole medium) to the shim,
        which then serves plain READ/WRITE (10)/(16) in the drain's batch, in C.

        :meth:`native_detach` takes it back -- required before the lender closes or
        remaps it (an exported buffer cannot be closed).  False if the buffer is too
        small to hold ``num_lbas`` blocks (the path stays off)."""
        buf = ffi.from_buffer("uint8_t[]", mem, require_writable=True)
        if len(buf) < num_lbas * block_size:
            ffi.release(buf)
            return False
        self._fast_mem = buf
        self._fast.mem = buf
        self._set_geometry(block_size, num_lbas, max_xfer, readonly)
        return True

    def attach_native_fd(self, fd: int, threads: int, write_through: bool, block_size: int,
                         num_lbas: int, max_xfer: int, readonly: bool) -> int:
        """Serve plain READ/WRITE (10)/(16) on ``fd`` with ``threads`` C worker threads
        (preadv/pwritev straight between the ring and the file, fdatasync after FUA or
        every write with ``write_through``).  Returns the eventfd that signals finished
        jobs: the caller runs :meth:`native_reap` when it is readable."""
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        rc = lib.tcmu_py_aio_start(self._fast, fd, efd, threads, int(write_through))
        if rc < 0:
            os.close(efd)
            raise OSError(-rc, "cannot start the native I/O threads")
        self.native_efd = efd
        self._set_geometry(block_size, num_lbas, max_xfer, readonly)
        return efd

    def _set_geometry(self, block_size: int, num_lbas: int, max_xfer: int, readonly: bool) -> None:
        f = self._fast
        f.block_size = block_size
        f.num_lbas = num_lbas
        f.max_xfer = min(max_xfer, 0xFFFFFFFF)
        f.readonly = int(readonly)
        f.fua_ok = 1  # memory: nothing volatile; fd: the worker fdatasyncs a FUA write
        self._native = True

    def native_detach(self) -> list[tuple[int, int, bool]]:
        """Take the native path away: no new commands, the fd workers finish what they
        have (this joins them: call it once :attr:`native_inflight` is 0) and their last
        results are queued; returns the failed ones (see :meth:`native_reap`)."""
        f = self._fast
        f.enabled = 0
        self._fast_on = False
        self._native = False
        fails: list[tuple[int, int, bool]] = []
        if f.aio != ffi.NULL:
            lib.tcmu_py_aio_stop(f)
            fails = self.native_reap()
            lib.tcmu_py_aio_free(f)
            os.close(self.native_efd)
            self.native_efd = -1
        f.mem = ffi.NULL
        if self._fast_mem is not None:
            ffi.release(self._fast_mem)
            self._fast_mem = None
        return fails

    def native_reap(self) -> list[tuple[int, int, bool]]:
        """Queue the completions of finished fd jobs (GOOD) and return the failed ones
        as (cmd_id, errno, is_write): their sense is the SCSI layer's to choose."""
        f = self._fast
        if self.native_efd >= 0:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.native_efd)
        fails: list[tuple[int, int, bool]] = []
        while True:
            if self._ncomp:
                self._write_comps()
            f.n_comp = 0
            nf = lib.tcmu_py_aio_reap(f, self._comps, _MAX_COMPS, self._fails, _MAX_COMPS)
            self._ncomp = f.n_comp
            for i in range(nf):
                e = self._fails[i]
                fails.append((int(e.cmd_id), int(e.err), bool(e.write)))
            if f.served < _MAX_COMPS:
                return fails

    @property
    def native_inflight(self) -> int:
        """fd jobs queued to the native workers and not yet reaped."""
        return int(self._fast.inflight)

    def native_gate(self, on: bool) -> None:
        """Open or close the native path for the next batches (the engine closes it while
        the SCSI layer must see every command: unit attention, format, recovery)."""
        on = on and self._native
        if on != self._fast_on:
            self._fast_on = on
            self._fast.enabled = int(on)

    def native_counts(self) -> tuple[int, int, int, int]:
        """(reads, writes, read bytes, write bytes) served natively since the start."""
        f = self._fast
        return int(f.reads), int(f.writes), int(f.read_bytes), int(f.write_bytes)

    def native_latency_histogram(self) -> list[int]:
        """Commands served natively per log2-microsecond latency bucket (drain to done)."""
        return list(self._fast.hist)

    # -- fetch -------------------------------------------------------------------------
    def drain(self) -> list[Command | TmrEntry | MalformedEntry]:
        """Every entry the kernel has published since the last drain, in ring order."""
        out: list[Command | TmrEntry | MalformedEntry] = []
        append = out.append
        unpack = _DESC.unpack_from
        view = self.view
        descs, iovs, tmr = self._descs, self._iovs, self._tmr_ids
        r = self._r
        self.native_served = 0
        while True:
            got = n = lib.tcmu_py_drain(r, descs, _MAX_DESCS, iovs, _MAX_IOVS, tmr, _MAX_TMR_IDS)
            if self._fast_on and n:
                if self._ncomp + n > _MAX_COMPS:
                    self._write_comps()
                f = self._fast
                f.n_comp = self._ncomp
                n = lib.tcmu_py_serve_fast(r, f, descs, n, iovs, self._comps, _MAX_COMPS)
                self._ncomp = f.n_comp
                self.native_served += got - n
            buf = self._desc_buf
            for i in range(n):
                (dlen, o0, l0, idx, cnt, bidi, tcnt, cmd_id, kind, clen, ttype, bad, cdb) = unpack(
                    buf, i * 80
                )
                if kind == 1:
                    if cnt == 1:
                        iov = [view[o0 : o0 + l0]]
                    elif cnt == 0:
                        iov = []
                    else:
                        iov = self._iov_views(idx, cnt)
                    cmd = Command(cmd_id, cdb[:clen], iov, dlen)
                    if bidi:
                        cmd.bidi = self._iov_views(idx + cnt, bidi)
                    append(cmd)
                elif kind == 2:
                    append(TmrEntry(ttype, tuple(tmr[idx + j] for j in range(tcnt))))
                elif kind == 3:
                    append(MalformedEntry(cmd_id, _shim.BAD_REASONS.get(bad, "malformed")))
                # kind 4 (unknown entry opcode) is flagged by the shim and needs nothing
            if got < _MAX_DESCS:
                return out

    def _iov_views(self, idx: int, cnt: int) -> list[memoryview]:
        view, buf, unpack = self.view, self._iov_buf, _IOV.unpack_from
        res = []
        for j in range(idx, idx + cnt):
            off, ln = unpack(buf, j * 16)
            res.append(view[off : off + ln])
        return res

    # -- completion ----------------------------------------------------------------------
    def complete(
        self, cmd_id: int, status: int, sense: bytes = b"", read_len: int = 0, uflags: int = 0
    ) -> None:
        """Queue one completion; it reaches the ring at the next :meth:`flush`.

        ``read_len`` > 0 sets TCMU_UFLAG_READ_LEN so the kernel reports the residual.
        """
        if self._ncomp == _MAX_COMPS:
            self._write_comps()
        # one pack_into per completion: far cheaper than four cffi attribute stores
        off = self._ncomp * _COMP_SIZE
        if read_len:
            uflags |= 0x2  # TCMU_UFLAG_READ_LEN
        if sense:
            n = min(len(sense), 96)
            _COMP_HEAD.pack_into(self._comp_buf, off, read_len, cmd_id, status, uflags, n)
            self._comp_buf[off + 16 : off + 16 + n] = sense[:n]
        else:
            _COMP_HEAD.pack_into(self._comp_buf, off, read_len, cmd_id, status, uflags, 0)
        self._ncomp += 1

    def _write_comps(self) -> None:
        n = self._ncomp
        if n and self._closed:
            self._ncomp = 0  # late results after close: the ring is gone, drop them
            return
        if n:
            self._ncomp = 0
            rc = lib.tcmu_py_complete(self._r, self._comps, n)
            if rc < 0:
                raise OSError(-rc, "ring completion: more completions than fetched commands")
            self._completed_since_wakeup = True

    def flush(self) -> bool:
        """Write queued completions and wake the kernel once; True if a wakeup was sent."""
        self._write_comps()
        if self._completed_since_wakeup and not self._closed:
            self._completed_since_wakeup = False
            _shim.wakeup(self.fd)
            self.wakeups += 1
            return True
        return False

    def reset(self) -> None:
        """After the kernel's reset_ring: restart the walk at the (zeroed) shared tail."""
        self._ncomp = 0
        lib.tcmu_py_ring_reset(self._r)

    def close(self) -> None:
        """Drop our references; the mapping goes away once no command view is left."""
        self._closed = True
        self._completed_since_wakeup = False
        self.native_detach()
        self.view.release()
        self._ptr = None
