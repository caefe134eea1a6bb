"""Task management through the engine on the simulated kernel: TMR entries are counted and
logged, aborted commands still in the handler are completed when it returns (the kernel
drops those results), a LUN RESET adds no unit attention of ours (LIO's core reports the
reset itself), and a late result never completes a newer command that reused its id."""

from __future__ import annotations

import concurrent.futures
import logging
import struct
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from tcmu_py import abi
from tcmu_py.sim import SimTarget
from tcmu_py.sim.kernel import BUSY, TASK_ABORTED, SimResult
from tcmu_py_handlers.ram import RamHandler

BS = 512


class GatedRam(RamHandler):
    """A RAM disk on worker threads: I/O at a byte offset listed in ``gates`` waits there
    until that event is set."""

    subtype = "gated"
    thread_model = "threads"
    threads = 4

    def open(self, dev, reopen):  # type: ignore[no-untyped-def]
        super().open(dev, reopen)
        self.gates: dict[int, threading.Event] = {}
        self.entered = threading.Semaphore(0)
        self.left = threading.Semaphore(0)

    def _wait(self, offset: int) -> None:
        gate = self.gates.get(offset)
        if gate is not None:
            self.entered.release()
            assert gate.wait(30), "the test never opened the gate"

    def read(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        self._wait(offset)
        super().read(offset, length, bufs)
        self.left.release()

    def write(self, offset: int, length: int, bufs: Sequence[memoryview], fua: bool) -> None:
        self._wait(offset)
        super().write(offset, length, bufs, fua)
        self.left.release()


@pytest.fixture
def target() -> Iterator[SimTarget]:
    with SimTarget(GatedRam, "gated/", size=4 << 20, data_size=1 << 20, cmdr_size=16 * 1024,
                   tmr_notification=True) as t:
        yield t


def _read16(lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0)


def _queue(t: SimTarget, cdb: bytes, data_in_len: int) -> tuple[object, concurrent.futures.Future[SimResult]]:
    fut: concurrent.futures.Future[SimResult] = concurrent.futures.Future()
    return t.kernel.queue(cdb, None, data_in_len, fut.set_result), fut


def _until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_lun_reset_is_counted_and_adds_no_unit_attention_of_ours(target: SimTarget, caplog) -> None:
    target.write(8, b"\x5a" * BS)
    with caplog.at_level(logging.INFO, logger="tcmu_py.engine"):
        target.kernel.lun_reset()
        _until(lambda: target.device.counters["tmr"] == 1)
    assert "TMR LUN_RESET: 0 aborted command(s)" in caplog.text
    tur = target.submit(bytes(6))  # TEST UNIT READY
    assert tur.status == 0, tur.sense.hex()
    assert not target.device.state.pending_ua
    assert target.read(8, 1) == b"\x5a" * BS


def test_abort_of_a_command_in_the_handler_completes_it_late_and_the_ring_stays_sound(
        target: SimTarget, caplog) -> None:
    h = target.device.handler
    target.write(16, b"\xc3" * BS)
    h.gates[16 * BS] = gate = threading.Event()
    cmd, fut = _queue(target, _read16(16, 1), BS)
    assert h.entered.acquire(timeout=10)
    with caplog.at_level(logging.INFO, logger="tcmu_py.engine"):
        target.kernel.abort([cmd])  # type: ignore[list-item]
        _until(lambda: target.device.counters["tmr"] == 1)
    assert "TMR ABORT_TASK: 1 aborted command(s) in the ring, 1 of them in the handler" in caplog.text
    assert fut.result(10).status == TASK_ABORTED  # the kernel's answer
    assert len(target.device.inflight) == 1  # still ours to complete
    gate.set()
    _until(lambda: not target.device.inflight)
    _until(lambda: not target.kernel.commands)  # the late completion freed its id
    assert target.kernel.stats["broken"] == 0 and not target.kernel.broken
    assert target.read(16, 1) == b"\xc3" * BS
    target.write(17, b"\x3c" * BS)
    assert target.read(17, 1) == b"\x3c" * BS


def test_a_late_result_never_completes_the_command_that_reused_its_id(target: SimTarget) -> None:
    h = target.device.handler
    target.write(32, b"\x11" * BS)
    target.write(64, b"\x22" * BS)
    h.gates[32 * BS] = gate1 = threading.Event()
    h.gates[64 * BS] = gate2 = threading.Event()
    _, first = _queue(target, _read16(32, 1), BS)
    assert h.entered.acquire(timeout=10)
    (old_id,) = target.device.inflight
    assert target._lt.call(target.device.fail_inflight) == 1  # stop/recovery answers BUSY
    assert first.result(10).status == BUSY
    _, second = _queue(target, _read16(64, 1), BS)
    assert h.entered.acquire(timeout=10)
    assert list(target.device.inflight) == [old_id]  # the lowest free id, reused

    gate1.set()  # the first command's handler call returns now: its result must be dropped
    assert h.left.acquire(timeout=10)
    for _ in range(3):  # let the loop run the call_soon_threadsafe callbacks
        target._lt.call(lambda: None)
    assert not second.done(), second.result(0)
    assert list(target.device.inflight) == [old_id]
    gate2.set()
    res = second.result(10)
    assert res.status == 0 and res.data == b"\x22" * BS
    assert target.kernel.stats["broken"] == 0


def test_tmr_type_names_cover_the_kernel_enum() -> None:
    from tcmu_py.engine import _TMR_NAMES

    kinds = [v for k, v in vars(abi).items() if k.startswith("TMR_") and k != "TMR_UNKNOWN"
             and not k.endswith("_OFF") and isinstance(v, int)]
    assert sorted(_TMR_NAMES) == sorted(kinds)
