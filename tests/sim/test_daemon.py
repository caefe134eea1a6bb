"""The runner's device lifecycle on the simulated kernel: netlink ADDED / RECONFIG /
REMOVED events, configfs read from a directory tree, every event answered, a bad
device refused while the others keep serving."""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcmu_py.control.configfs import ConfigFS
from tcmu_py.control.netlink import NetlinkEvent, TcmuCmd
from tcmu_py.daemon import Runner
from tcmu_py.registry import load_handlers
from tcmu_py.ring import Ring
from tcmu_py.sim.kernel import SimKernel

MiB = 1024 * 1024


class FakeHost:
    """configfs + /sys/class/uio trees and one SimKernel per uio minor."""

    def __init__(self, root: Path) -> None:
        self.cfs_root = root / "core"
        self.params = root / "params"
        self.uio_root = root / "uio"
        for d in (self.cfs_root, self.params, self.uio_root):
            d.mkdir(parents=True)
        (self.params / "block_netlink").write_text("0")
        (self.params / "reset_netlink").write_text("0")
        self.kernels: dict[int, SimKernel] = {}

    def add(self, minor: int, name: str, dev_config: str, size: int, hba: int = 1) -> SimKernel:
        k = SimKernel(cmdr_size=64 * 1024, data_size=8 * MiB)
        k.start()
        self.kernels[minor] = k
        d = self.cfs_root / f"user_{hba}" / name
        for sub in ("attrib", "action", "wwn"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "attrib/hw_block_size").write_text("512\n")
        (d / "attrib/hw_max_sectors").write_text("128\n")
        (d / "attrib/emulate_write_cache").write_text("0\n")
        (d / "action/block_dev").write_text("")  # configfs always has the action files
        (d / "action/reset_ring").write_text("")
        (d / "info").write_text(f"Status: ACTIVATED  Config: {dev_config} Size: {size} "
                                "MaxDataAreaMB: 1024 DataPagesPerBlk: 1 CmdRingSizeMB: 8\n")
        (d / "wwn/vpd_unit_serial").write_text(f"T10 VPD Unit Serial Number: serial-{name}\n")
        u = self.uio_root / f"uio{minor}"
        (u / "maps/map0").mkdir(parents=True)
        (u / "name").write_text(f"tcm-user/{hba}/{name}/{dev_config}\n")
        (u / "maps/map0/size").write_text(hex(k.map_size) + "\n")
        return k

    def ring_factory(self, minor: int, map_size: int) -> tuple[int, Ring]:
        k = self.kernels[minor]
        assert map_size == k.map_size
        fd = os.dup(k.user_fd)  # the runner closes what it is given
        return fd, Ring(fd, map_size, map_fd=k.memfd)

    def close(self) -> None:
        for k in self.kernels.values():
            k.close()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[FakeHost, Runner, asyncio.AbstractEventLoop]]:
    h = FakeHost(tmp_path)
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    runner = Runner(
        loop,
        load_handlers(None),
        configfs=ConfigFS(str(h.cfs_root), str(h.params)),
        uio_root=str(h.uio_root),
        use_netlink=False,
        ring_factory=h.ring_factory,
    )
    yield h, runner, loop
    asyncio.run_coroutine_threadsafe(runner.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    h.close()


def run(loop: asyncio.AbstractEventLoop, coro):  # type: ignore[no-untyped-def]
    return asyncio.run_coroutine_threadsafe(coro, loop).result(30)


def event(cmd: TcmuCmd, minor: int, name: str, cfg: str, hba: int = 1, **kw) -> NetlinkEvent:  # type: ignore[no-untyped-def]
    return NetlinkEvent(cmd, f"tcm-user/{hba}/{name}/{cfg}", minor, 100 + minor, **kw)


def submit(k: SimKernel, cdb: bytes, data_out: bytes | None = None, n: int = 0):  # type: ignore[no-untyped-def]
    done = threading.Event()
    box = []
    k.queue(cdb, data_out, n, lambda r: (box.append(r), done.set()))
    assert done.wait(10)
    return box[0]


def test_added_device_is_served_and_removed_device_is_released(host):
    h, runner, loop = host
    k = h.add(0, "ram0", "ram/", 4 * MiB)
    assert run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 0, "ram0", "ram/"))) == 0
    data = os.urandom(4096)
    assert submit(k, struct.pack(">BBQIBB", 0x8A, 0, 8, 8, 0, 0), data).status == 0
    assert submit(k, struct.pack(">BBQIBB", 0x88, 0, 8, 8, 0, 0), None, 4096).data == data
    inq = submit(k, bytes([0x12, 1, 0x80, 0, 255, 0]), None, 255)
    assert b"serial-ram0" in inq.data  # VPD 0x80 from configfs wwn/vpd_unit_serial
    assert run(loop, runner.handle_event(event(TcmuCmd.REMOVED_DEVICE, 0, "ram0", "ram/"))) == 0
    assert not runner.served


def test_a_bad_config_string_is_refused_and_other_devices_keep_serving(host, tmp_path):
    h, runner, loop = host
    good = h.add(0, "ram0", "ram/", 4 * MiB)
    h.add(1, "bad", "file//nonexistent-dir/x", 4 * MiB)
    h.add(2, "nohandler", "qcow//tmp/x", 4 * MiB)
    assert run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 0, "ram0", "ram/"))) == 0
    st = run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 1, "bad", "file//nonexistent-dir/x")))
    assert st < 0
    st = run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 2, "nohandler", "qcow//tmp/x")))
    assert st < 0
    assert list(runner.served) == [(1, "ram0")]
    assert submit(good, bytes(6)).status == 0


def test_resize_reaches_the_handler_and_raises_a_unit_attention(host):
    h, runner, loop = host
    k = h.add(0, "ram0", "ram/", 4 * MiB)
    run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 0, "ram0", "ram/")))
    ev = event(TcmuCmd.RECONFIG_DEVICE, 0, "ram0", "ram/", dev_size=8 * MiB)
    assert run(loop, runner.handle_event(ev)) == 0
    r = submit(k, bytes(6))  # TEST UNIT READY sees the UA first
    assert r.status == 2 and r.sense[2] & 0xF == 6 and (r.sense[12], r.sense[13]) == (0x2A, 0x09)
    r = submit(k, bytes([0x25]) + bytes(9), None, 8)
    last, bs = struct.unpack(">II", r.data)
    assert (last + 1) * bs == 8 * MiB


def test_events_for_externally_served_subtypes_get_no_reply(host):
    h, runner, loop = host
    runner.external.add("syn")
    h.add(0, "s0", "syn/x", 4 * MiB)
    assert run(loop, runner.handle_event(event(TcmuCmd.ADDED_DEVICE, 0, "s0", "syn/x"))) is None


def test_reconfig_of_an_unknown_device_is_answered_with_an_error(host):
    _h, runner, loop = host
    ev = event(TcmuCmd.RECONFIG_DEVICE, 9, "ghost", "ram/", dev_size=MiB)
    assert run(loop, runner.handle_event(ev)) == -errno.ENODEV


def test_restart_reattaches_live_devices(host):
    """start() scans /sys/class/uio and re-attaches every tcm-user device (block_dev,
    reset_ring, open, unblock), so a restarted runner serves what the old one did."""
    h, runner, loop = host
    k = h.add(0, "ram0", "ram/", 4 * MiB)
    run(loop, runner.start())
    assert list(runner.served) == [(1, "ram0")]
    action = h.cfs_root / "user_1/ram0/action"
    assert (action / "reset_ring").read_text() == "1"
    assert (action / "block_dev").read_text() == "0"  # unblocked again
    assert submit(k, bytes(6)).status == 0
