"""uio uevents as the runner's second signal, against the real kernel.

An in-process runner that does not listen to netlink at all (``use_netlink=False``) but
runs the real pyudev monitor (kernel uevents: no udevd in the guest). The test's own
netlink listener answers the kernel, so the runner can learn of the device only from its
uio uevents: it must attach it once, serve real I/O through a tcm_loop LUN, and release
it once when the backstore is deleted.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tcmu_py.daemon import Runner, default_uio_monitor
from tcmu_py.registry import load_handlers

from .blockio import read_direct, write_direct
from .conftest import NAME_PREFIX, OP_TIMEOUT, KernelLab, hba_of, in_background
from .runnerproc import loopback_disk, require_guest

pytestmark = [
    pytest.mark.guest,
    pytest.mark.filterwarnings("ignore:Cannot set dbroot:UserWarning"),
]

NAME = NAME_PREFIX + "uevent-ram"
WWN = "naa.5001405aabbcc300"


@pytest.fixture
def runner() -> Iterator[tuple[Runner, asyncio.AbstractEventLoop]]:
    require_guest("this test serves a SCSI disk from an in-process runner")
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, name="uevent-runner", daemon=True)
    t.start()
    r = Runner(loop, load_handlers(None), use_netlink=False, uio_monitor=default_uio_monitor,
               uio_add_grace=0.5)
    try:
        asyncio.run_coroutine_threadsafe(r.start(), loop).result(OP_TIMEOUT)
        yield r, loop
    finally:
        asyncio.run_coroutine_threadsafe(r.stop(), loop).result(OP_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)


def _until(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def _remove_target() -> None:
    from rtslib_fb import FabricModule, Target

    loop = FabricModule("loopback")
    if any(t.wwn == WWN for t in loop.targets):
        Target(loop, WWN, mode="lookup").delete()


def test_a_device_heard_of_only_from_its_uevent_is_served_then_released(
        lab: KernelLab, runner: tuple[Runner, asyncio.AbstractEventLoop]) -> None:
    from rtslib_fb import LUN, TPG, FabricModule, Target

    r, _loop = runner
    assert r.uio_monitor is not None and r.uio_monitor.source == "kernel"
    assert r.netlink is None  # the runner cannot hear ADDED/REMOVED
    try:
        so = lab.created(NAME, config="ram/", size=16 << 20)  # the lab answers the kernel
        key = (hba_of(so), NAME)
        _until(lambda: key in r.served, "attached from the uio uevent")
        assert r.counters["udev_attached"] == 1

        in_background(lambda: LUN(TPG(Target(FabricModule("loopback"), WWN), 1), 0, so),
                      "LUN").result(OP_TIMEOUT)
        disk = loopback_disk(WWN, 0)
        data = os.urandom(256 << 10)
        write_direct(disk, 1 << 20, data)
        assert read_direct(disk, 1 << 20, len(data)) == data
        time.sleep(1.0)  # a repeated uevent or a late reconcile must not attach it again
        assert r.counters["udev_attached"] == 1 and list(r.served) == [key]

        in_background(_remove_target, "remove the LUN").result(OP_TIMEOUT)
        lab.deleted(NAME)
        _until(lambda: not r.served, "released after the uio device went away")
        assert r.counters["udev_released"] == 1
    finally:
        in_background(_remove_target, "cleanup").result(OP_TIMEOUT)
