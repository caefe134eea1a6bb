"""The native data path (plain READ/WRITE served in C from the ram handler's memory).

The Python SCSI layer stays the authority: every test here compares a device with the
native path against the same device with it off, byte for byte -- status, sense, data
and the medium -- so the C path can only ever be a faster way to the same answer.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_py.engine import native_medium
from tcmu_py.scsi import add_unit_attention
from tcmu_py.sim import SimTarget
from tcmu_py_handlers.ram import RamHandler

BS = 512
SIZE = 1 << 20
NUM_LBAS = SIZE // BS
MAX_SECTORS = 64


def _target(native: bool) -> SimTarget:
    t = SimTarget(RamHandler, "ram/", size=SIZE, hw_max_sectors=MAX_SECTORS,
                  data_size=1 << 20, cmdr_size=16 * 1024)
    if not native:
        t._lt.call(t.device.native_release)
    return t


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[SimTarget, SimTarget]]:
    a, b = _target(True), _target(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _counts(t: SimTarget) -> tuple[int, int, int, int]:
    return t._lt.call(t.device.ring.native_counts)


def _medium(t: SimTarget) -> bytes:
    return t._lt.call(lambda: bytes(t.device.handler._mem[:SIZE]))


def rw(op: int, lba: int, n: int, flags: int = 0) -> bytes:
    if op in (0x28, 0x2A):
        return struct.pack(">BBIBHB", op, flags, lba & 0xFFFFFFFF, 0, n & 0xFFFF, 0)
    return struct.pack(">BBQIBB", op, flags, lba, n & 0xFFFFFFFF, 0, 0)


def test_plain_reads_and_writes_are_served_natively_and_read_back() -> None:
    with _target(True) as t:
        assert t.device.native
        rnd = random.Random(7)
        data = rnd.randbytes(8 * BS)
        t.write(100, data)  # WRITE (16)
        assert t.submit(rw(0x2A, 200, 8, flags=0x08), data).status == 0  # WRITE (10) FUA
        assert t.read(100, 8) == data  # READ (16)
        res = t.submit(rw(0x28, 200, 8), None, 8 * BS)  # READ (10)
        assert (res.status, res.data) == (0, data)
        assert _counts(t) == (2, 2, 16 * BS, 16 * BS)
        assert t.device.counters["commands"] == 4
        assert _medium(t)[100 * BS : 108 * BS] == data


def test_a_pending_unit_attention_is_reported_before_native_reads() -> None:
    with _target(True) as t:
        t._lt.call(add_unit_attention, t.device.state, 0x2A, 0x09)
        res = t.submit(rw(0x88, 0, 1), None, BS)
        assert res.status == 2 and res.sense[2] & 0x0F == 6  # UNIT ATTENTION
        assert (res.sense[12], res.sense[13]) == (0x2A, 0x09)
        assert t.submit(rw(0x88, 0, 1), None, BS).status == 0
        assert _counts(t)[0] == 1


def test_a_handler_whose_read_is_replaced_never_gets_the_native_path() -> None:
    class Audited(RamHandler):
        def read(self, offset: int, length: int, bufs: list[memoryview]) -> None:  # type: ignore[override]
            super().read(offset, length, bufs)

    h = Audited()
    assert native_medium(h) == (None, None)
    h2 = RamHandler()
    h2.read = lambda *a: None  # type: ignore[method-assign]
    assert native_medium(h2) == (None, None)


def test_concurrent_commands_with_fragmented_iovecs_round_trip() -> None:
    """Many commands in flight at once make the data area hand out scattered blocks,
    so the native path copies through several iovecs per command."""
    with _target(True) as t:
        rnd = random.Random(3)
        writes = []
        for _ in range(40):
            n = rnd.choice([1, 3, 8, 17, 64])
            lba = rnd.randrange(0, NUM_LBAS - n)
            writes.append((lba, rnd.randbytes(n * BS)))
        futs = [t.submit_nowait(rw(0x8A, lba, len(d) // BS), d) for lba, d in writes]
        assert all(f.result(30).status == 0 for f in futs)
        expect = bytearray(SIZE)
        for lba, d in writes:  # same order as the ring: later writes win
            expect[lba * BS : lba * BS + len(d)] = d
        assert _medium(t) == bytes(expect)
        futs = [t.submit_nowait(rw(0x88, lba, len(d) // BS), None, len(d)) for lba, d in writes]
        for f, (lba, d) in zip(futs, writes, strict=True):
            res = f.result(30)
            assert res.status == 0 and res.data == bytes(expect[lba * BS : lba * BS + len(d)])
        assert _counts(t)[:2] == (40, 40)


_ops = st.sampled_from([0x28, 0x2A, 0x88, 0x8A])
_lbas = st.one_of(st.integers(0, NUM_LBAS + 2), st.sampled_from([NUM_LBAS - 1, 2**32 - 1, 2**64 - 1]))
_lens = st.one_of(st.integers(0, MAX_SECTORS + 2), st.sampled_from([0xFFFF, 2**32 - 1]))
_flags = st.sampled_from([0, 0x08, 0x10, 0x18, 0x20, 0x02, 0x04, 0xE0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=_ops, lba=_lbas, n=_lens, flags=_flags, skew=st.sampled_from([0, 0, 0, BS, -BS]),
       seed=st.integers(0, 2**16))
def test_native_and_python_answers_are_identical(
    pair: tuple[SimTarget, SimTarget], op: int, lba: int, n: int, flags: int, skew: int, seed: int
) -> None:
    """Any READ/WRITE (10)/(16) -- out of range, too long, wrong data length, protection
    bits, zero length -- gets the same status, sense and data, and leaves the same medium."""
    a, b = pair
    if op in (0x28, 0x2A):
        lba &= 0xFFFFFFFF
        n &= 0xFFFF
    n_eff = min(n, 2 * MAX_SECTORS)  # the data we send or ask for stays small
    length = max(0, n_eff * BS + skew)
    write = op & 0x02
    data = random.Random(seed).randbytes(length) if write else None
    cdb = rw(op, lba, n, flags)
    ra = a.submit(cdb, data, 0 if write else length)
    rb = b.submit(cdb, data, 0 if write else length)
    assert (ra.status, ra.sense, ra.data) == (rb.status, rb.sense, rb.data)
    if write and ra.status == 0:
        assert _medium(a) == _medium(b)


# ---- the fd path: the file handler's image served by C worker threads ------------------


def _file_target(path: str, native: bool) -> SimTarget:
    from tcmu_py_handlers.file import FileHandler

    t = SimTarget(FileHandler, f"file/{path}", size=SIZE, hw_max_sectors=MAX_SECTORS,
                  data_size=1 << 20, cmdr_size=16 * 1024)
    if not native:
        t._lt.run(t.device.native_quiesce())
    return t


@pytest.fixture(scope="module")
def file_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimTarget, SimTarget]]:
    d = tmp_path_factory.mktemp("native-fd")
    a, b = _file_target(str(d / "a.img"), True), _file_target(str(d / "b.img"), False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _file_medium(t: SimTarget) -> bytes:
    with open(t.device.handler.dev.config.path, "rb") as f:
        return f.read()


def test_file_reads_and_writes_are_served_by_the_native_threads(tmp_path) -> None:
    with _file_target(str(tmp_path / "x.img"), True) as t:
        assert t.device.native and t.device.ring.native_efd >= 0
        rnd = random.Random(11)
        futs, writes = [], []
        for i in range(64):
            data = rnd.randbytes(8 * BS)
            writes.append(data)
            futs.append(t.submit_nowait(rw(0x8A, i * 8, 8, flags=0x08 if i % 7 == 0 else 0), data))
        assert all(f.result(30).status == 0 for f in futs)
        assert _file_medium(t)[: 64 * 8 * BS] == b"".join(writes)
        assert t.read(0, 8) == writes[0]
        assert _counts(t)[:2] == (1, 64)
        assert t.device.ring.native_inflight == 0


def test_a_file_read_past_the_end_of_a_shrunk_image_fails_like_the_python_path(
    file_pair: tuple[SimTarget, SimTarget]
) -> None:
    """preadv hits end of file: the C worker hands EIO back, the SCSI layer picks the sense."""
    a, b = file_pair
    results = []
    for t in (a, b):
        path = t.device.handler.dev.config.path
        os.truncate(path, SIZE // 2)
        try:
            results.append(t.submit(rw(0x88, NUM_LBAS - 8, 8), None, 8 * BS))
        finally:
            os.truncate(path, SIZE)
    ra, rb = results
    assert ra.status == 2 and ra.sense[2] & 0x0F == 3  # MEDIUM ERROR
    assert (ra.status, ra.sense) == (rb.status, rb.sense)


def test_quiesce_waits_for_every_native_job_then_python_serves(tmp_path) -> None:
    with _file_target(str(tmp_path / "q.img"), True) as t:
        data = random.Random(5).randbytes(64 * BS)
        futs = [t.submit_nowait(rw(0x8A, i * 64, 64), data) for i in range(32)]
        t._lt.run(t.device.native_quiesce())
        assert not t.device.native and t.device.ring.native_efd == -1
        assert all(f.result(30).status == 0 for f in futs)
        assert t.read(31 * 64, 64) == data
        assert t._lt.call(t.device.native_acquire)
        assert t.read(0, 64) == data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=_ops, lba=_lbas, n=_lens, flags=_flags, skew=st.sampled_from([0, 0, 0, BS, -BS]),
       seed=st.integers(0, 2**16))
def test_native_fd_and_python_answers_are_identical(
    file_pair: tuple[SimTarget, SimTarget], op: int, lba: int, n: int, flags: int, skew: int,
    seed: int,
) -> None:
    a, b = file_pair
    if op in (0x28, 0x2A):
        lba &= 0xFFFFFFFF
        n &= 0xFFFF
    length = max(0, min(n, 2 * MAX_SECTORS) * BS + skew)
    write = op & 0x02
    data = random.Random(seed).randbytes(length) if write else None
    cdb = rw(op, lba, n, flags)
    ra = a.submit(cdb, data, 0 if write else length)
    rb = b.submit(cdb, data, 0 if write else length)
    assert (ra.status, ra.sense, ra.data) == (rb.status, rb.sense, rb.data)
    if write and ra.status == 0:
        assert _file_medium(a) == _file_medium(b)
