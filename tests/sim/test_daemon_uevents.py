"""uio uevents as the runner's second signal, on the simulated kernel: a uio device that
appears without a netlink ADDED is attached once, one that goes away without a REMOVED is
released once, and nothing is ever attached twice whichever signal comes first."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_daemon import FakeHost, MiB, event, run, submit

from tcmu_py.control.configfs import ConfigFS
from tcmu_py.control.netlink import TcmuCmd
from tcmu_py.control.uio import UioEvent
from tcmu_py.daemon import Runner
from tcmu_py.registry import load_handlers


def _runner(h: FakeHost, loop: asyncio.AbstractEventLoop, **kw) -> Runner:  # type: ignore[no-untyped-def]
    return Runner(loop, load_handlers(None), configfs=ConfigFS(str(h.cfs_root), str(h.params)),
                  uio_root=str(h.uio_root), use_netlink=False, ring_factory=h.ring_factory, **kw)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[FakeHost, Runner, asyncio.AbstractEventLoop]]:
    """As test_daemon's: a fake host and a runner without netlink or monitor; the tests
    hand it events directly."""
    h = FakeHost(tmp_path)
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    runner = _runner(h, loop)
    yield h, runner, loop
    asyncio.run_coroutine_threadsafe(runner.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    h.close()


def _add(minor: int) -> UioEvent:
    return UioEvent("add", minor, f"uio{minor}")


def _remove(minor: int) -> UioEvent:
    return UioEvent("remove", minor, f"uio{minor}")


def _io_works(k) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(4096)
    assert submit(k, struct.pack(">BBQIBB", 0x8A, 0, 8, 8, 0, 0), data).status == 0
    assert submit(k, struct.pack(">BBQIBB", 0x88, 0, 8, 8, 0, 0), None, 4096).data == data


def test_a_uio_device_without_added_is_attached_once_and_a_late_added_is_answered(host):
    h, runner, loop = host
    k = h.add(0, "ram0", "ram/", 4 * MiB)
    assert run(loop, runner.reconcile_uio(_add(0))) == "attached"
    served = runner.served[(1, "ram0")]
    _io_works(k)
    assert run(loop, runner.reconcile_uio(_add(0))) is None  # a repeated uevent
    # the ADDED that was only late: answered 0, the device is not opened a second time
    assert run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 0, "ram0", "ram/"))) == 0
    assert runner.served == {(1, "ram0"): served}
    assert runner.counters["udev_attached"] == 1
    _io_works(k)


def test_after_netlink_added_the_uevent_changes_nothing(host):
    h, runner, loop = host
    k = h.add(0, "ram0", "ram/", 4 * MiB)
    assert run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 0, "ram0", "ram/"))) == 0
    served = runner.served[(1, "ram0")]
    assert run(loop, runner.reconcile_uio(_add(0))) is None
    assert runner.served == {(1, "ram0"): served}
    assert runner.counters["udev_attached"] == 0
    _io_works(k)


def test_a_device_netlink_refused_is_not_attached_from_its_uevent(host):
    h, runner, loop = host
    h.add(1, "bad", "file//nonexistent-dir/x", 4 * MiB)
    st = run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 1, "bad", "file//nonexistent-dir/x")))
    assert st < 0
    assert run(loop, runner.reconcile_uio(_add(1))) is None
    assert not runner.served


def test_uevents_for_devices_of_no_local_handler_are_left_alone(host):
    h, runner, loop = host
    h.add(2, "nohandler", "qcow//tmp/x", 4 * MiB)
    runner.external.add("syn")
    h.add(3, "ext", "syn/x", 4 * MiB)
    assert run(loop, runner.reconcile_uio(_add(2))) is None
    assert run(loop, runner.reconcile_uio(_add(3))) is None
    assert run(loop, runner.reconcile_uio(_add(4))) is None  # no such uio device at all
    assert not runner.served


def test_a_device_gone_without_removed_is_released_once(host):
    h, runner, loop = host
    h.add(0, "ram0", "ram/", 4 * MiB)
    assert run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 0, "ram0", "ram/"))) == 0
    shutil.rmtree(h.uio_root / "uio0")  # the uio device is unregistered
    assert run(loop, runner.reconcile_uio(_remove(0))) == "released"
    assert not runner.served
    assert run(loop, runner.reconcile_uio(_remove(0))) is None
    # the REMOVED that was only late is still answered
    assert run(loop, runner.handle_event(event(TcmuCmd.REMOVED_DEVICE, 0, "ram0", "ram/"))) == 0
    assert runner.counters["udev_released"] == 1


def test_a_stale_remove_leaves_the_live_device_alone(host):
    h, runner, loop = host
    k = h.add(0, "ram0", "ram/", 4 * MiB)
    assert run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 0, "ram0", "ram/"))) == 0
    assert run(loop, runner.reconcile_uio(_remove(0))) is None  # uio0 is still ram0
    assert list(runner.served) == [(1, "ram0")]
    _io_works(k)


class FakeMonitor:
    """What the runner needs of a UioMonitor: a readable fd and queued events."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.queued: list[UioEvent] = []
        self.lock = threading.Lock()
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    def fileno(self) -> int:
        return self.r

    def push(self, ev: UioEvent) -> None:
        with self.lock:
            self.queued.append(ev)
        os.write(self.w, b"x")

    def poll(self) -> list[UioEvent]:
        with contextlib.suppress(BlockingIOError):
            os.read(self.r, 4096)
        with self.lock:
            out, self.queued = self.queued, []
        return out

    def close(self) -> None:
        self.closed = True
        os.close(self.r)
        os.close(self.w)


def _until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_monitor_uevents_flow_through_the_runner(tmp_path: Path) -> None:
    h = FakeHost(tmp_path)
    mon = FakeMonitor()
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    runner = _runner(h, loop, uio_monitor=lambda: mon, uio_add_grace=0.05)
    try:
        run(loop, runner.start())
        assert mon.started and runner.uio_monitor is mon
        k = h.add(5, "ram5", "ram/", 4 * MiB)
        mon.push(_add(5))
        mon.push(_add(5))  # a duplicate uevent: still one attach
        _until(lambda: (1, "ram5") in runner.served)
        time.sleep(0.2)
        assert runner.counters["udev_attached"] == 1
        _io_works(k)
        shutil.rmtree(h.uio_root / "uio5")
        mon.push(_remove(5))
        _until(lambda: not runner.served)
        assert runner.counters["udev_released"] == 1
    finally:
        asyncio.run_coroutine_threadsafe(runner.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        h.close()
    assert mon.closed
