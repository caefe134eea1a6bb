"""The conformance suite: what every handler must do, as an initiator sees it.

Every check goes through SCSI commands on the simulated kernel and the production
engine, so it covers the handler *and* the runner around it: data integrity over the
whole device and at its edges, range checks, SYNCHRONIZE CACHE, FUA, UNMAP as READ
CAPACITY (16) advertises it, WRITE SAME, COMPARE AND WRITE (including its atomicity
under concurrency), and how handler errors reach the initiator.

Run it by subclassing :class:`ConformanceSuite` in a test module under a name pytest
collects::

    class TestConformance(ConformanceSuite):
        cases = [ConformanceCase("rbd", RbdHandler, rbd_dev_config, size=64 << 20)]

``cases`` None (the default) means every handler ``load_handlers(None)`` finds.  A
read-only case gets the read-only half of the suite; everything else gets the rest.
"""

from __future__ import annotations

import errno
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import pytest

from tcmu_py.handler import Handler, implemented
from tcmu_py.scsi._model import SenseKey
from tcmu_py.sim import SimResult, SimTarget

from . import _cdb as cdb
from ._cases import ConformanceCase, default_cases

__all__ = ["ConformanceSuite", "InjectedBug", "faulty"]

_F = TypeVar("_F", bound=Callable[..., Any])

_ILLEGAL = SenseKey.ILLEGAL_REQUEST
_LBA_OUT_OF_RANGE = 0x21  # SBC-4 4.5: LOGICAL BLOCK ADDRESS OUT OF RANGE
_WRITE_PROTECTED = 0x27  # SBC-4 4.11
_MISCOMPARE_DURING_VERIFY = 0x1D  # SBC-4 5.3


def writable(test: _F) -> _F:
    """Run ``test`` only for cases that accept writes."""
    test._conformance_applies = False  # type: ignore[attr-defined]
    return test


def read_only(test: _F) -> _F:
    """Run ``test`` only for read-only cases."""
    test._conformance_applies = True  # type: ignore[attr-defined]
    return test


# ---- a handler that fails where it is told to ------------------------------------------


class InjectedBug(Exception):
    """What a faulty handler raises to stand for a bug (not an OSError, not sense)."""


#: Blocks where :func:`faulty` handlers fail, and how.
EIO_LBA, BUG_LBA, ENOSPC_LBA = 3, 5, 7


def faulty(base: type[Handler], block_size: int) -> type[Handler]:
    """A subclass of ``base`` whose data methods fail on three blocks.

    Touching :data:`EIO_LBA` raises ``OSError(EIO)``, :data:`BUG_LBA` raises
    :class:`InjectedBug`, :data:`ENOSPC_LBA` (writes only) ``OSError(ENOSPC)``; any other
    block is served by ``base``.  Only methods ``base`` implements are wrapped, so the
    subclass has exactly the capabilities of ``base``.
    """

    def check(offset: int, length: int, writing: bool) -> None:
        def hit(lba: int) -> bool:
            return offset <= lba * block_size < offset + length

        if hit(EIO_LBA):
            raise OSError(errno.EIO, "injected I/O error")
        if hit(BUG_LBA):
            raise InjectedBug("injected handler bug")
        if writing and hit(ENOSPC_LBA):
            raise OSError(errno.ENOSPC, "injected out of space")

    def read(self: Handler, offset: int, length: int, bufs: Sequence[memoryview]) -> Any:
        check(offset, length, False)
        return base.read(self, offset, length, bufs)

    def write(self: Handler, offset: int, length: int, bufs: Sequence[memoryview], fua: bool) -> Any:
        check(offset, length, True)
        return base.write(self, offset, length, bufs, fua)

    def write_same(self: Handler, offset: int, length: int, pattern: bytes, unmap: bool) -> Any:
        check(offset, length, True)
        return base.write_same(self, offset, length, pattern, unmap)

    def compare_and_write(self: Handler, offset: int, compare: bytes, data: bytes) -> Any:
        check(offset, len(compare), True)
        return base.compare_and_write(self, offset, compare, data)

    methods: dict[str, Any] = {"read": read, "write": write}
    have = implemented(base)
    if "write_same" in have:
        methods["write_same"] = write_same
    if "compare_and_write" in have:
        methods["compare_and_write"] = compare_and_write
    return type(f"Faulty{base.__name__}", (base,), methods)


# ---- helpers ------------------------------------------------------------------------------


def _pipelined(
    target: SimTarget, commands: Iterable[tuple[bytes, bytes | None, int]], depth: int = 16
) -> Iterator[SimResult]:
    """Keep ``depth`` commands in flight, as an initiator with a queue would."""
    window: list[Any] = []
    for cdb_, data_out, data_in_len in commands:
        window.append(target.submit_nowait(cdb_, data_out, data_in_len))
        if len(window) >= depth:
            yield window.pop(0).result(30)
    for fut in window:
        yield fut.result(30)


def _capacity(target: SimTarget) -> cdb.Capacity:
    res = target.submit(cdb.read_capacity16(), data_in_len=32)
    cdb.expect_good(res, "READ CAPACITY (16)")
    return cdb.Capacity.parse(res.data)


def _chunks(rnd: random.Random, total: int, most: int) -> list[tuple[int, int]]:
    """Cover ``[0, total)`` blocks with random (lba, n) pieces of 1..most blocks."""
    out, lba = [], 0
    while lba < total:
        n = min(rnd.randint(1, most), total - lba)
        out.append((lba, n))
        lba += n
    return out


def _fill(target: SimTarget, rnd: random.Random, lba: int, n: int) -> bytes:
    data = rnd.randbytes(n * target.block_size)
    target.write(lba, data)
    return data


# ---- the suite -----------------------------------------------------------------------------


class ConformanceSuite:
    """The checks every handler must pass; subclass it as ``Test...`` to run them.

    ``cases`` lists :class:`ConformanceCase` objects (or ``pytest.param`` wrapping
    them); None means :func:`default_cases`, every handler that is installed.
    """

    cases: ClassVar[Sequence[ConformanceCase | Any] | None] = None
    #: How many COMPARE AND WRITEs race for one block in the atomicity check.
    caw_racers: ClassVar[int] = 16

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "conformance_case" not in metafunc.fixturenames:
            return
        params = [
            c.param() if isinstance(c, ConformanceCase) else c
            for c in (default_cases() if self.cases is None else self.cases)
        ]
        wants = getattr(metafunc.function, "_conformance_applies", None)
        if wants is not None:
            params = [p for p in params if _readonly_of(p) in (None, wants)]
        if not params:
            kind = "read-only" if wants else "writable"
            reason = f"no {kind} case in {type(self).__name__}.cases"
            params = [pytest.param(None, id=f"no-{kind}-case", marks=pytest.mark.skip(reason=reason))]
        metafunc.parametrize("conformance_case", params)

    @pytest.fixture
    def target(
        self, conformance_case: ConformanceCase, request: pytest.FixtureRequest
    ) -> Iterator[SimTarget]:
        """The case's device, served on a fresh simulated kernel for each test."""
        with conformance_case.serve(request) as t:
            yield t

    @pytest.fixture
    def faulty_target(
        self, conformance_case: ConformanceCase, request: pytest.FixtureRequest
    ) -> Iterator[SimTarget]:
        """The case's device behind :func:`faulty`: it fails on three chosen blocks."""
        handler = faulty(conformance_case.handler_class(request), conformance_case.block_size)
        with conformance_case.serve(request, handler) as t:
            yield t

    # -- what every device does ---------------------------------------------------------------

    def test_inquiry_answers_a_direct_access_block_device(self, target: SimTarget) -> None:
        cdb.expect_good(target.submit(bytes(6)), "TEST UNIT READY")
        res = target.submit(cdb.inquiry(96), data_in_len=96)
        cdb.expect_good(res, "INQUIRY")
        assert res.data[0] & 0x1F == 0x00, f"peripheral device type {res.data[0] & 0x1F:#x}"

    def test_read_capacity_16_reports_the_configured_size(
        self, target: SimTarget, conformance_case: ConformanceCase
    ) -> None:
        cap = _capacity(target)
        assert cap.block_size == conformance_case.block_size
        assert cap.num_lbas * cap.block_size == conformance_case.size

    def test_mode_sense_write_protect_matches_the_case(
        self, target: SimTarget, conformance_case: ConformanceCase
    ) -> None:
        res = target.submit(cdb.mode_sense10(), data_in_len=0xFFFF)
        cdb.expect_good(res, "MODE SENSE (10)")
        write_protected = bool(res.data[3] & 0x80)  # SBC-4 6.5.1 DEVICE-SPECIFIC PARAMETER
        assert write_protected == conformance_case.is_readonly, (
            f"MODE SENSE says WP={int(write_protected)}; the case says "
            f"readonly={conformance_case.is_readonly}"
        )

    def test_logical_block_provisioning_vpd_agrees_with_read_capacity_16(
        self, target: SimTarget
    ) -> None:
        cap = _capacity(target)
        res = target.submit(cdb.inquiry(64, page=0xB2), data_in_len=64)
        cdb.expect_good(res, "INQUIRY VPD B2h")
        lbpu, lbprz = bool(res.data[5] & 0x80), bool(res.data[5] & 0x04)  # SBC-4 6.6.6
        assert (lbpu, lbprz) == (cap.lbpme, cap.lbprz), (
            f"VPD B2h LBPU={lbpu} LBPRZ={lbprz}, READ CAPACITY (16) LBPME={cap.lbpme} "
            f"LBPRZ={cap.lbprz}"
        )

    def test_every_block_can_be_read(self, target: SimTarget) -> None:
        most = target.device.state.max_xfer_len
        commands = (
            (cdb.read16(lba, n), None, n * target.block_size)
            for lba, n in _chunks(random.Random(3), target.num_lbas, most)
        )
        for res in _pipelined(target, commands):
            cdb.expect_good(res, "READ (16)")

    @pytest.mark.parametrize("command", ["READ (10)", "READ (16)"])
    def test_reads_past_the_last_block_are_refused_with_lba_out_of_range(
        self, target: SimTarget, command: str
    ) -> None:
        build = cdb.read10 if command == "READ (10)" else cdb.read16
        far = 0xFFFF_FFFF if command == "READ (10)" else 2**64 - 1
        end = target.num_lbas
        for lba, n in [(end, 1), (end - 1, 2), (far, 1)]:
            res = target.submit(build(lba, n), data_in_len=n * target.block_size)
            cdb.expect_sense(res, _ILLEGAL, _LBA_OUT_OF_RANGE, what=f"{command} lba {lba} n {n}")

    def test_synchronize_cache_is_good(self, target: SimTarget) -> None:
        cdb.expect_good(target.submit(cdb.synchronize_cache10()), "SYNCHRONIZE CACHE (10)")
        cdb.expect_good(target.submit(cdb.synchronize_cache16()), "SYNCHRONIZE CACHE (16)")
        res = target.submit(cdb.synchronize_cache16(target.num_lbas - 8, 8))
        cdb.expect_good(res, "SYNCHRONIZE CACHE (16) of the last 8 blocks")

    def test_synchronize_cache_past_the_last_block_is_refused(self, target: SimTarget) -> None:
        res = target.submit(cdb.synchronize_cache16(target.num_lbas - 1, 2))
        cdb.expect_sense(res, _ILLEGAL, _LBA_OUT_OF_RANGE, what="SYNCHRONIZE CACHE (16)")

    def test_unmap_is_refused_when_read_capacity_16_reports_no_lbpme(
        self, target: SimTarget
    ) -> None:
        if _capacity(target).lbpme:
            pytest.skip("the device can unmap (LBPME=1)")
        cdb_, params = cdb.unmap([(0, 8)])
        res = target.submit(cdb_, params)
        # SBC-4 5.37: UNMAP is served only with LBPU=1; otherwise it is an unsupported
        # command, INVALID COMMAND OPERATION CODE.
        cdb.expect_sense(res, _ILLEGAL, 0x20, what="UNMAP without LBPME")

    def test_a_read_error_in_the_handler_is_a_medium_error(self, faulty_target: SimTarget) -> None:
        res = faulty_target.submit(cdb.read16(EIO_LBA, 1), data_in_len=faulty_target.block_size)
        # SPC-4 Annex D: 11h/00h UNRECOVERED READ ERROR
        cdb.expect_sense(res, SenseKey.MEDIUM_ERROR, 0x11, what="READ of a block failing with EIO")

    def test_a_handler_bug_is_a_hardware_error_logged_once_and_the_device_keeps_serving(
        self, faulty_target: SimTarget, caplog: pytest.LogCaptureFixture
    ) -> None:
        t, bs = faulty_target, faulty_target.block_size
        with caplog.at_level(logging.ERROR):
            for _ in range(2):
                res = t.submit(cdb.read16(BUG_LBA, 1), data_in_len=bs)
                # SPC-4 Annex D: 44h/00h INTERNAL TARGET FAILURE
                cdb.expect_sense(res, SenseKey.HARDWARE_ERROR, 0x44, what="READ hitting a bug")
        cdb.expect_good(t.submit(cdb.read16(BUG_LBA + 1, 1), data_in_len=bs), "READ after the bug")
        lines = [r.getMessage() for r in caplog.records if "InjectedBug" in r.getMessage()]
        assert len(lines) == 1, f"expected one log line for the bug, got {lines}"
        assert type(t.device.handler).__name__ in lines[0] and "read" in lines[0], lines[0]

    # -- a writable device -----------------------------------------------------------------------

    @writable
    def test_random_patterns_over_the_whole_device_read_back(self, target: SimTarget) -> None:
        rnd = random.Random(1)
        bs, most = target.block_size, target.device.state.max_xfer_len
        image = rnd.randbytes(target.num_lbas * bs)
        writes = (
            (cdb.write16(lba, n), image[lba * bs : (lba + n) * bs], 0)
            for lba, n in _chunks(rnd, target.num_lbas, most)
        )
        for res in _pipelined(target, writes):
            cdb.expect_good(res, "WRITE (16)")
        pieces = _chunks(rnd, target.num_lbas, most)  # cut differently from the writes
        reads = ((cdb.read16(lba, n), None, n * bs) for lba, n in pieces)
        for (lba, n), res in zip(pieces, _pipelined(target, reads), strict=True):
            cdb.expect_good(res, f"READ (16) lba {lba} n {n}")
            want = image[lba * bs : (lba + n) * bs]
            cdb.expect_data(res.data, want, lba=lba, block_size=bs, what="whole-device read-back")

    @writable
    @pytest.mark.parametrize("size", ["10", "16"])
    def test_the_first_block_the_last_block_and_a_request_ending_at_the_last_block_read_back(
        self, target: SimTarget, size: str
    ) -> None:
        rnd = random.Random(2)
        bs, end = target.block_size, target.num_lbas
        write, read = (cdb.write10, cdb.read10) if size == "10" else (cdb.write16, cdb.read16)
        n = min(17, target.device.state.max_xfer_len)
        for lba, count in [(0, 1), (end - 1, 1), (end - n, n), (0, n)]:
            data = rnd.randbytes(count * bs)
            cdb.expect_good(target.submit(write(lba, count), data), f"WRITE ({size}) lba {lba}")
            res = target.submit(read(lba, count), data_in_len=count * bs)
            cdb.expect_good(res, f"READ ({size}) lba {lba} n {count}")
            cdb.expect_data(res.data, data, lba=lba, block_size=bs, what=f"READ ({size})")

    @writable
    def test_writes_past_the_last_block_are_refused_and_change_nothing(
        self, target: SimTarget
    ) -> None:
        bs, end = target.block_size, target.num_lbas
        last = _fill(target, random.Random(4), end - 1, 1)
        for build, name in [(cdb.write10, "WRITE (10)"), (cdb.write16, "WRITE (16)")]:
            for lba, n in [(end, 1), (end - 1, 2)]:
                res = target.submit(build(lba, n), b"\xee" * (n * bs))
                cdb.expect_sense(res, _ILLEGAL, _LBA_OUT_OF_RANGE, what=f"{name} lba {lba} n {n}")
        cdb.expect_data(target.read(end - 1, 1), last, lba=end - 1, block_size=bs, what="last block")

    @writable
    @pytest.mark.parametrize("size", ["10", "16"])
    def test_fua_writes_read_back(self, target: SimTarget, size: str) -> None:
        rnd = random.Random(5)
        bs = target.block_size
        write, read = (cdb.write10, cdb.read10) if size == "10" else (cdb.write16, cdb.read16)
        for lba, n in [(0, 8), (target.num_lbas - 3, 3)]:
            data = rnd.randbytes(n * bs)
            cdb.expect_good(target.submit(write(lba, n, fua=True), data), f"WRITE ({size}) FUA")
            res = target.submit(read(lba, n, fua=True), data_in_len=n * bs)
            cdb.expect_good(res, f"READ ({size}) FUA")
            cdb.expect_data(res.data, data, lba=lba, block_size=bs, what="FUA read-back")

    @writable
    def test_unmap_leaves_the_blocks_around_its_ranges_alone(self, target: SimTarget) -> None:
        if not _capacity(target).lbpme:
            pytest.skip("the device cannot unmap (LBPME=0)")
        bs = target.block_size
        before = _fill(target, random.Random(6), 0, 128)
        cdb_, params = cdb.unmap([(1, 3), (9, 20)])
        cdb.expect_good(target.submit(cdb_, params), "UNMAP")
        after = target.read(0, 128)
        for lba in [0, 4, 5, 6, 7, 8, *range(29, 128)]:
            got, want = after[lba * bs : (lba + 1) * bs], before[lba * bs : (lba + 1) * bs]
            cdb.expect_data(got, want, lba=lba, block_size=bs, what="block next to an UNMAP range")

    @writable
    def test_unmapped_blocks_read_back_as_zeroes_when_read_capacity_16_reports_lbprz(
        self, target: SimTarget
    ) -> None:
        cap = _capacity(target)
        if not cap.lbprz:
            pytest.skip("the device does not promise zeroes after UNMAP (LBPRZ=0)")
        bs, end = target.block_size, target.num_lbas
        rnd = random.Random(7)
        ranges = [(0, 1), (5, 3), (100, 2048 + 5), (end - 1, 1)]  # odd sizes, past page edges
        for lba, n in ranges:
            for start in range(lba, lba + n, 128):
                _fill(target, rnd, start, min(128, lba + n - start))
        cdb_, params = cdb.unmap(ranges)
        cdb.expect_good(target.submit(cdb_, params), "UNMAP")
        for lba, n in ranges:
            for start in range(lba, lba + n, 128):
                count = min(128, lba + n - start)
                got = target.read(start, count)
                cdb.expect_data(got, bytes(count * bs), lba=start, block_size=bs, what="unmapped")

    @writable
    def test_unmap_past_the_last_block_is_refused_and_unmaps_nothing(
        self, target: SimTarget
    ) -> None:
        if not _capacity(target).lbpme:
            pytest.skip("the device cannot unmap (LBPME=0)")
        bs, end = target.block_size, target.num_lbas
        first = _fill(target, random.Random(8), 0, 4)
        cdb_, params = cdb.unmap([(0, 4), (end - 1, 2)])  # SBC-4 5.37.1: checked before any
        cdb.expect_sense(target.submit(cdb_, params), _ILLEGAL, _LBA_OUT_OF_RANGE, what="UNMAP")
        cdb.expect_data(target.read(0, 4), first, lba=0, block_size=bs, what="the valid range")

    @writable
    @pytest.mark.parametrize("size", ["10", "16"])
    def test_write_same_fills_its_range_with_a_non_zero_pattern_and_nothing_else(
        self, target: SimTarget, size: str
    ) -> None:
        bs = target.block_size
        pattern = bytes(range(1, 256)) * (bs // 255) + b"\x5a" * (bs % 255)
        lba, n = 7, (3 << 20) // bs // 2 + 3  # 1.5 MiB and a bit: more than one 1 MiB chunk
        below = _fill(target, random.Random(9), lba - 1, 1)
        above = _fill(target, random.Random(10), lba + n, 1)
        build = cdb.write_same10 if size == "10" else cdb.write_same16
        cdb.expect_good(target.submit(build(lba, n), pattern), f"WRITE SAME ({size})")
        for start in range(lba, lba + n, 128):
            count = min(128, lba + n - start)
            got = target.read(start, count)
            cdb.expect_data(got, pattern * count, lba=start, block_size=bs, what="WRITE SAME")
        cdb.expect_data(target.read(lba - 1, 1), below, lba=lba - 1, block_size=bs, what="before")
        cdb.expect_data(target.read(lba + n, 1), above, lba=lba + n, block_size=bs, what="after")

    @writable
    @pytest.mark.parametrize("pattern", ["zeroes", "non-zero"])
    def test_write_same_with_the_unmap_bit_reads_back_its_pattern(
        self, target: SimTarget, pattern: str
    ) -> None:
        bs = target.block_size
        block = bytes(bs) if pattern == "zeroes" else b"\xc3" * bs
        lba, n = 64, 300
        for start in range(lba, lba + n, 100):
            _fill(target, random.Random(start), start, 100)
        res = target.submit(cdb.write_same16(lba, n, unmap=True), block)
        cdb.expect_good(res, "WRITE SAME (16) UNMAP=1")
        for start in range(lba, lba + n, 100):
            got = target.read(start, 100)
            cdb.expect_data(got, block * 100, lba=start, block_size=bs, what="WRITE SAME UNMAP=1")

    @writable
    def test_write_same_16_without_a_data_out_buffer_writes_zeroes(
        self, target: SimTarget
    ) -> None:
        bs = target.block_size
        _fill(target, random.Random(11), 10, 20)
        cdb.expect_good(target.submit(cdb.write_same16(10, 20, ndob=True)), "WRITE SAME (16) NDOB")
        cdb.expect_data(target.read(10, 20), bytes(20 * bs), lba=10, block_size=bs, what="NDOB")

    @writable
    def test_compare_and_write_with_matching_data_replaces_the_block(
        self, target: SimTarget
    ) -> None:
        rnd, bs, lba = random.Random(12), target.block_size, target.num_lbas - 1
        old, new = _fill(target, rnd, lba, 1), rnd.randbytes(bs)
        cdb.expect_good(target.submit(cdb.compare_and_write(lba), old + new), "COMPARE AND WRITE")
        cdb.expect_data(target.read(lba, 1), new, lba=lba, block_size=bs, what="after CAW")
        res = target.submit(cdb.compare_and_write(lba, fua=True), new + old)
        cdb.expect_good(res, "COMPARE AND WRITE with FUA")
        cdb.expect_data(target.read(lba, 1), old, lba=lba, block_size=bs, what="after CAW FUA")

    @writable
    def test_compare_and_write_miscompare_reports_the_first_differing_byte_and_writes_nothing(
        self, target: SimTarget
    ) -> None:
        rnd, bs, lba = random.Random(13), target.block_size, 42
        old = _fill(target, rnd, lba, 1)
        wrong = bytearray(old)
        wrong[137] ^= 0xFF
        wrong[400] ^= 0x01
        res = target.submit(cdb.compare_and_write(lba), bytes(wrong) + rnd.randbytes(bs))
        # SBC-4 5.3: MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION, INFORMATION = the
        # offset of the first differing byte in the Data-Out buffer.
        cdb.expect_sense(
            res, SenseKey.MISCOMPARE, _MISCOMPARE_DURING_VERIFY, info=137, what="COMPARE AND WRITE"
        )
        cdb.expect_data(target.read(lba, 1), old, lba=lba, block_size=bs, what="after a miscompare")

    @writable
    def test_concurrent_compare_and_writes_expecting_the_same_data_let_exactly_one_win(
        self, target: SimTarget
    ) -> None:
        rnd, bs, lba = random.Random(14), target.block_size, 9
        old = _fill(target, rnd, lba, 1)
        news = [bytes([i]) + rnd.randbytes(bs - 1) for i in range(self.caw_racers)]
        futures = [target.submit_nowait(cdb.compare_and_write(lba), old + new) for new in news]
        results = [f.result(30) for f in futures]
        winners = [i for i, r in enumerate(results) if r.status == 0]
        assert len(winners) == 1, f"{len(winners)} of {len(news)} COMPARE AND WRITEs succeeded"
        won = news[winners[0]]
        first_diff = next(i for i in range(bs) if old[i] != won[i])
        for i, res in enumerate(results):
            if i != winners[0]:
                cdb.expect_sense(
                    res,
                    SenseKey.MISCOMPARE,
                    _MISCOMPARE_DURING_VERIFY,
                    info=first_diff,
                    what=f"losing COMPARE AND WRITE #{i}",
                )
        cdb.expect_data(target.read(lba, 1), won, lba=lba, block_size=bs, what="the winner's data")

    @writable
    @pytest.mark.parametrize(
        ("lba", "key", "asc", "ascq"),
        [
            pytest.param(
                EIO_LBA,
                SenseKey.MEDIUM_ERROR,
                0x0C,
                0x00,
                id="EIO-write-error",
            ),
            pytest.param(ENOSPC_LBA, SenseKey.DATA_PROTECT, 0x27, 0x07, id="ENOSPC-space-failed"),
        ],
    )
    def test_a_write_error_in_the_handler_maps_to_its_sense(
        self, faulty_target: SimTarget, lba: int, key: int, asc: int, ascq: int
    ) -> None:
        # SPC-4 Annex D: 0Ch/00h WRITE ERROR; SBC-4 4.7.3.7: 27h/07h SPACE ALLOCATION FAILED
        # WRITE PROTECT.
        res = faulty_target.submit(cdb.write16(lba, 1), b"\x11" * faulty_target.block_size)
        cdb.expect_sense(res, key, asc, ascq, what=f"WRITE of block {lba}")

    @writable
    def test_a_handler_bug_during_compare_and_write_is_a_hardware_error(
        self, faulty_target: SimTarget
    ) -> None:
        t, bs = faulty_target, faulty_target.block_size
        res = t.submit(cdb.compare_and_write(BUG_LBA), bytes(2 * bs))
        cdb.expect_sense(res, SenseKey.HARDWARE_ERROR, 0x44, what="COMPARE AND WRITE hitting a bug")
        # the per-device COMPARE AND WRITE lock was released: the next one runs
        cdb.expect_good(t.submit(cdb.compare_and_write(BUG_LBA + 1), bytes(2 * bs)), "next CAW")

    # -- a read-only device ------------------------------------------------------------------------

    @read_only
    def test_writes_to_a_read_only_device_answer_data_protect_and_change_nothing(
        self, target: SimTarget
    ) -> None:
        bs = target.block_size
        before = target.read(0, 2)
        attempts = [
            ("WRITE (10)", cdb.write10(0, 1), b"\x11" * bs),
            ("WRITE (16)", cdb.write16(0, 1, fua=True), b"\x11" * bs),
            ("WRITE SAME (10)", cdb.write_same10(0, 2), b"\x22" * bs),
            ("WRITE SAME (16)", cdb.write_same16(0, 2), b"\x22" * bs),
            ("COMPARE AND WRITE", cdb.compare_and_write(0), before[:bs] + b"\x33" * bs),
        ]
        for name, cdb_, data in attempts:
            res = target.submit(cdb_, data)
            cdb.expect_sense(res, SenseKey.DATA_PROTECT, _WRITE_PROTECTED, what=name)
        cdb.expect_data(target.read(0, 2), before, lba=0, block_size=bs, what="read-only blocks")


def _readonly_of(param: Any) -> bool | None:
    """The readonly flag of a ``pytest.param(case)``, None for a placeholder entry."""
    values = getattr(param, "values", (param,))
    case = values[0] if values else None
    return case.is_readonly if isinstance(case, ConformanceCase) else None
