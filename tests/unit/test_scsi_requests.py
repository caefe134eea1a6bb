"""The sans-IO contract: what dispatch hands the engine, how compound commands react to
handler failures, FUA, and FORMAT UNIT running in the background.

These use the in-memory executor directly (they look at requests and background jobs,
which only exist on this side of the engine).
"""

from __future__ import annotations

import errno
import types

import pytest
from scsi_exec import CC, ILLEGAL, MemDevice, be, cdb6, decode_sense, execute, rw10, rw16, sa_in16

from tcmu_py.scsi import (
    GOOD,
    Caps,
    DeviceState,
    Flush,
    Read,
    SenseError,
    SenseKey,
    Unmap,
    Write,
    WriteSame,
    dispatch,
)

BS = 512


def _dev(**kw: object) -> MemDevice:
    return MemDevice.make(**kw)  # type: ignore[arg-type]


# ---- the single-step requests -----------------------------------------------------------------


def test_read_passes_the_ring_buffers_straight_through():
    st = DeviceState("d", "ram/d", 512, 1024)
    iov = [memoryview(bytearray(1024)), memoryview(bytearray(1024))]
    out = dispatch(rw10(0x28, 8, 4), iov, 2048, st)
    assert type(out) is Read
    assert out == Read(8 * 512, 2048, iov, None) and out.bufs is iov


def test_write_carries_fua():
    st = DeviceState("d", "ram/d", 4096, 1024)
    iov = [memoryview(bytearray(4096))]
    assert dispatch(rw16(0x8A, 3, 1), iov, 4096, st) == Write(3 * 4096, 4096, iov, False)
    out = dispatch(rw16(0x8A, 3, 1, flags=0x08), iov, 4096, st)
    assert type(out) is Write and out.fua is True and out.bufs is iov


def test_synchronize_cache_is_a_flush_when_the_handler_has_one():
    st = DeviceState("d", "ram/d", 512, 64, caps=Caps(flush=True))
    assert dispatch(rw10(0x35, 0, 0), [], 0, st) == Flush()
    st = DeviceState("d", "ram/d", 512, 64)
    assert dispatch(rw10(0x35, 0, 0), [], 0, st) == GOOD


def test_fua_write_is_flushed_when_the_handler_has_no_native_fua():
    dev = _dev(caps=Caps(flush=True))
    assert execute(dev, rw10(0x2A, 0, 1, flags=0x08), bytes(BS)).status == 0
    assert dev.flushes == 1
    native = _dev(caps=Caps(flush=True, fua=True))
    assert execute(native, rw10(0x2A, 0, 1, flags=0x08), bytes(BS)).status == 0
    assert native.flushes == 0


def test_compare_and_write_with_fua_flushes_after_the_write():
    dev = _dev(caps=Caps(flush=True))
    cdb = bytes((0x89, 0x08)) + be(0, 8) + bytes(3) + b"\x01\0\0"
    assert execute(dev, cdb, bytes(BS) + b"\x01" * BS).status == 0
    assert isinstance(dev.requests[-1], Flush)


def test_compare_and_write_is_always_a_generator_for_the_engine_to_serialise():
    st = DeviceState("d", "ram/d", 512, 64, caps=Caps(caw=True))
    cdb = bytes((0x89, 0)) + be(0, 8) + bytes(3) + b"\x01\0\0"
    out = dispatch(cdb, [memoryview(bytearray(1024))], 1024, st)
    assert isinstance(out, types.GeneratorType)


def test_write_same_uses_native_write_same_when_there_is_one():
    dev = _dev(caps=Caps(write_same=True))
    pattern = b"\x5a" * BS
    assert execute(dev, rw16(0x93, 2, 100), pattern).status == 0
    assert dev.requests == [WriteSame(2 * BS, 100 * BS, pattern, False)]


def test_write_same_with_unmap_becomes_one_unmap():
    dev = _dev()
    assert execute(dev, rw16(0x93, 2, 100, flags=0x08), bytes(BS)).status == 0
    assert dev.requests == [Unmap(2 * BS, 100 * BS)]


def test_write_same_is_written_in_chunks_without_native_support():
    dev = _dev(num_lbas=8192, caps=Caps())
    assert execute(dev, rw16(0x93, 0, 8192), b"\x01" * BS).status == 0
    writes = [r for r in dev.requests if isinstance(r, Write)]
    assert sum(w.length for w in writes) == 8192 * BS and len(writes) > 1
    assert dev.read_blocks(8191, 1) == b"\x01" * BS


# ---- handler failures ---------------------------------------------------------------------


def test_read_error_from_the_handler():
    """errno EIO on a read: MEDIUM ERROR, UNRECOVERED READ ERROR (SPC-4 Annex D 11h/00h)."""
    dev = _dev()
    dev.fail(Read, errno.EIO)
    res = execute(dev, rw10(0x28, 0, 1), alloc_len=BS)
    assert res.status == CC and decode_sense(res.sense)[:3] == (SenseKey.MEDIUM_ERROR, 0x11, 0)


def test_write_error_from_the_handler():
    """errno EIO on a write: MEDIUM ERROR, WRITE ERROR (0Ch/00h)."""
    dev = _dev()
    dev.fail(Write, errno.EIO)
    res = execute(dev, rw10(0x2A, 0, 1), bytes(BS))
    assert res.status == CC and decode_sense(res.sense)[:3] == (SenseKey.MEDIUM_ERROR, 0x0C, 0)


def test_a_failure_inside_a_compound_command_ends_it_with_that_sense():
    dev = _dev(num_lbas=8192, caps=Caps())
    dev.fail(Write, errno.ENOSPC, when=lambda r: r.offset > 0)  # the second chunk
    res = execute(dev, rw16(0x93, 0, 8192), b"\x01" * BS)
    s = decode_sense(res.sense)
    assert res.status == CC and (s.key, s.asc, s.ascq) == (SenseKey.DATA_PROTECT, 0x27, 0x07)
    assert len([r for r in dev.requests if isinstance(r, Write)]) == 2  # stopped there


def test_busy_from_the_handler_is_a_busy_status():
    dev = _dev()
    dev.fail(Read, errno.EAGAIN)
    cdb = bytes((0x89, 0)) + be(0, 8) + bytes(3) + b"\x01\0\0"
    res = execute(dev, cdb, bytes(2 * BS))
    assert res.status == 0x08 and res.sense == b""


def test_emulated_compare_and_write_read_failure_writes_nothing():
    dev = _dev()
    dev.fail(Read, SenseError(SenseKey.MEDIUM_ERROR, 0x11, 0x00))
    cdb = bytes((0x89, 0)) + be(0, 8) + bytes(3) + b"\x01\0\0"
    res = execute(dev, cdb, bytes(BS) + b"\x01" * BS)
    assert res.status == CC and decode_sense(res.sense).asc == 0x11
    assert not any(isinstance(r, Write) for r in dev.requests)


def test_verify_medium_error_is_reported():
    dev = _dev()
    dev.fail(Read, errno.EIO)
    res = execute(dev, rw10(0x2F, 0, 4))
    assert res.status == CC and decode_sense(res.sense)[:2] == (SenseKey.MEDIUM_ERROR, 0x11)


# ---- GET LBA STATUS ---------------------------------------------------------------------------


def test_get_lba_status_fits_descriptors_into_the_allocation_length():
    """SBC-3 GET LBA STATUS: as many descriptors as fit; PARAMETER DATA LENGTH says how
    many were returned."""
    dev = _dev()
    for lba in (1, 3, 5, 7):
        execute(dev, rw16(0x93, lba, 1, flags=0x09))  # WRITE SAME NDOB UNMAP
    res = execute(dev, sa_in16(0x12, 8 + 3 * 16), alloc_len=8 + 3 * 16)
    assert res.data[0:4] == be(4 + 3 * 16, 4)
    descs = [res.data[8 + 16 * i : 24 + 16 * i] for i in range(3)]
    assert [(int.from_bytes(d[:8], "big"), int.from_bytes(d[8:12], "big"), d[12]) for d in descs] == [
        (0, 1, 0),
        (1, 1, 1),
        (2, 1, 0),
    ]


# ---- FORMAT UNIT in the background -----------------------------------------------------------


def _format_immed() -> bytes:
    return bytes((0, 0x02, 0, 0))  # short header: IMMED=1, no defect list


def test_format_unit_immed_runs_in_the_background_and_reports_progress():
    """SBC-3 FORMAT UNIT IMMED=1 / SPC-4 REQUEST SENSE: NOT READY, FORMAT IN PROGRESS with
    a progress indication, until the format completes."""
    dev = _dev(num_lbas=8192, caps=Caps())
    execute(dev, rw10(0x2A, 0, 8), b"\x01" * (8 * BS))
    assert execute(dev, cdb6(0x04, b1=0x10), _format_immed()).status == 0
    assert len(dev.background) == 1

    res = execute(dev, cdb6(0x00))  # TEST UNIT READY while formatting
    s = decode_sense(res.sense)
    assert res.status == CC and (s.key, s.asc, s.ascq) == (SenseKey.NOT_READY, 0x04, 0x04)
    assert s.progress == 0

    dev.run_background(steps=2)
    res = execute(dev, cdb6(0x03, b4=18), alloc_len=18)  # REQUEST SENSE
    s = decode_sense(res.data)
    assert res.status == 0 and (s.key, s.asc, s.ascq) == (SenseKey.NOT_READY, 0x04, 0x04)
    assert 0 < s.progress < 0x10000
    assert execute(dev, b"\x12\0\0\0\x24\0", alloc_len=36).status == 0  # INQUIRY is answered
    assert execute(dev, rw10(0x28, 0, 1), alloc_len=BS).status == CC

    dev.run_background()
    assert dev.background_results == [GOOD]
    assert execute(dev, cdb6(0x00)).status == 0
    assert execute(dev, rw10(0x28, 0, 8), alloc_len=8 * BS).data == bytes(8 * BS)


def test_format_unit_background_failure_is_a_deferred_error():
    """SPC-4 deferred errors: reported by REQUEST SENSE with response code 71h."""
    dev = _dev(num_lbas=8192, caps=Caps())
    dev.fail(Write, errno.EIO)
    assert execute(dev, cdb6(0x04, b1=0x10), _format_immed()).status == 0
    dev.run_background()
    assert execute(dev, cdb6(0x00)).status == 0
    res = execute(dev, cdb6(0x03, b4=18), alloc_len=18)
    s = decode_sense(res.data)
    assert s.deferred and (s.key, s.asc, s.ascq) == (SenseKey.MEDIUM_ERROR, 0x31, 0x01)


def test_format_unit_uses_unmap_when_that_reads_back_zero():
    dev = _dev()
    assert execute(dev, cdb6(0x04)).status == 0
    assert dev.requests == [Unmap(0, 128 * BS)]


def test_format_unit_foreground_failure_fails_the_command():
    dev = _dev(caps=Caps())
    dev.fail(Write, errno.EIO)
    res = execute(dev, cdb6(0x04))
    assert res.status == CC and decode_sense(res.sense)[:3] == (SenseKey.MEDIUM_ERROR, 0x31, 0x01)
    assert dev.state.format_progress is None


@pytest.mark.parametrize("cdb", [rw10(0x28, 0, 1), rw10(0x2A, 0, 1)])
def test_range_is_checked_before_any_request(cdb):
    st = DeviceState("d", "ram/d", 512, 1)
    out = dispatch(rw10(cdb[0], 1, 1), [memoryview(bytearray(512))], 512, st)
    assert out.status == CC  # type: ignore[union-attr]
    assert decode_sense(out.sense)[:3] == (ILLEGAL, 0x21, 0x00)  # type: ignore[union-attr]
