"""The control plane against the real target_core_user: netlink, uio, configfs, recovery."""

from __future__ import annotations

import errno
import mmap
import os
import select
import struct
import time
from pathlib import Path

import pytest

from tcmu_py import abi
from tcmu_py.control import (
    ConfigFSError,
    ModuleLoadError,
    TcmuCmd,
    UioEvent,
    UioMonitor,
    find,
    load_module,
    parse_uio_name,
    scan,
)

from .conftest import NAME_PREFIX, KernelLab, hba_of, in_background

pytestmark = [
    pytest.mark.guest,
    # rtslib warns that /etc/target is already in use as db_root: expected in the guest.
    pytest.mark.filterwarnings("ignore:Cannot set dbroot:UserWarning"),
]

DEFAULT_MAP_SIZE = abi.DEFAULT_DATA_AREA_BYTES + abi.DEFAULT_CMD_RING_BYTES  # 1 GiB + 8 MiB
STILL_BLOCKED_S = 1.0  # long enough for an unanswered create to have finished if it did not wait


def test_load_module_runs_modprobe_for_a_module_sysfs_does_not_show(tmp_path: Path) -> None:
    load_module("target_core_user", sys_module=str(tmp_path))  # a real, successful modprobe
    with pytest.raises(ModuleLoadError, match="tcmu_py_no_such_module"):
        load_module("tcmu_py_no_such_module")


def test_added_device_waits_for_our_reply_and_completes_on_success(lab: KernelLab) -> None:
    name = NAME_PREFIX + "added"
    lab.nl.set_features(reply_supported=True)
    creating = lab.create(name, config="ram/x;y=1/z")

    ev = lab.next_event(TcmuCmd.ADDED_DEVICE, name)
    parsed = parse_uio_name(ev.device)
    assert parsed is not None
    assert (parsed.dev_name, parsed.cfgstring, parsed.subtype) == (name, "ram/x;y=1/z", "ram")
    info = find(parsed.hba, name)
    assert info is not None and ev.minor == info.minor  # uio exists before the event is sent
    assert ev.device_id >= 0
    # ADDED carries the config inside DEVICE only; DEV_CFG is for RECONFIG_DEVICE.
    assert ev.dev_cfg is None

    time.sleep(STILL_BLOCKED_S)
    assert not creating.done(), "the kernel did not wait for ADDED_DEVICE_DONE"
    assert lab.nl.reply(ev, 0) == 0  # 0: the kernel matched our reply with its waiter
    so = creating.result(30)
    assert so.name == name and hba_of(so) == parsed.hba
    lab.deleted(name)


def test_a_negative_reply_fails_the_creation(lab: KernelLab) -> None:
    name = NAME_PREFIX + "refused"
    lab.nl.set_features(reply_supported=True)
    creating = lab.create(name)
    ev = lab.next_event(TcmuCmd.ADDED_DEVICE, name)
    assert lab.nl.reply(ev, -errno.EINVAL) == 0  # the kernel took the reply...
    # ...and failed the enable write. rtslib's buffered file then retries that write on
    # close(), so a second ADDED_DEVICE (new DEVICE_ID) follows: refuse it too.
    with pytest.raises(OSError) as err:
        lab.answer_until(creating, status=-errno.EINVAL)
    assert err.value.errno == errno.EINVAL
    assert not any(i.dev_name == name for i in scan()), "uio device survived a refused add"


def test_the_enable_write_fails_with_exactly_the_status_we_reply(lab: KernelLab) -> None:
    name = NAME_PREFIX + "raw"
    lab.nl.set_features(reply_supported=True)
    path = lab.raw_device(name)
    enabling = lab.enable(path)
    ev = lab.next_event(TcmuCmd.ADDED_DEVICE, name)
    assert lab.nl.reply(ev, -errno.ENOKEY) == 0
    with pytest.raises(ConfigFSError) as err:
        enabling.result(30)
    assert err.value.errno == errno.ENOKEY
    time.sleep(STILL_BLOCKED_S)  # one write() is one attempt: no second event
    assert [e for e in lab.nl.recv_events() if e.cmd == TcmuCmd.ADDED_DEVICE] == []

    # A waiter nobody answers is released by reset_netlink. The kernel returns -EINTR,
    # Python retries the write (PEP 475), and the retry fails with EAGAIN because
    # block_netlink is still set: the write ends, and no new waiter is left behind.
    enabling = lab.enable(path)
    lab.next_event(TcmuCmd.ADDED_DEVICE, name)
    lab.release_waiters(enabling)
    with pytest.raises(ConfigFSError) as err:
        enabling.result(0)
    assert err.value.errno == errno.EAGAIN
    with open(os.path.join(path, "enable")) as f:
        assert f.read().strip() == "0"


def test_uio_scan_and_the_mailbox_of_a_fresh_device(lab: KernelLab) -> None:
    name = NAME_PREFIX + "uio"
    lab.nl.set_features(reply_supported=True)
    so = lab.created(name, config="ram/some;opt=1")
    (info,) = [i for i in scan() if i.dev_name == name]
    assert (info.hba, info.cfgstring, info.subtype) == (hba_of(so), "ram/some;opt=1", "ram")
    assert info.name == f"tcm-user/{info.hba}/{name}/ram/some;opt=1"
    assert info.map_size == DEFAULT_MAP_SIZE
    assert info.dev_path == f"/dev/uio{info.minor}"

    fd = os.open(info.dev_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as busy:  # the uio device is exclusive (tcmu_open)
            os.close(os.open(info.dev_path, os.O_RDWR))
        assert busy.value.errno == errno.EBUSY
        with pytest.raises(OSError) as wrong_size:  # only the exact map size is accepted
            mmap.mmap(fd, info.map_size - mmap.PAGESIZE)
        assert wrong_size.value.errno == errno.EINVAL
        m = mmap.mmap(fd, info.map_size)
        try:
            version, flags, cmdr_off, cmdr_size, cmd_head = struct.unpack_from("<HHIII", m, 0)
            (cmd_tail,) = struct.unpack_from("<I", m, abi.MB_CMD_TAIL_OFF)
        finally:
            m.close()
    finally:
        os.close(fd)
    assert version == abi.TCMU_MAILBOX_VERSION == 2
    assert flags == abi.MB_FLAGS_ALL  # OOOC | READ_LEN | TMR | KEEP_BUF on 6.1
    assert cmdr_off == abi.CMDR_OFF == 128
    assert cmdr_size == abi.DEFAULT_CMDR_SIZE == 8 * 1024 * 1024 - 128
    assert cmd_head == cmd_tail == 0
    lab.deleted(name)


def test_configfs_reads_the_device_and_runs_its_actions(lab: KernelLab) -> None:
    name = NAME_PREFIX + "cfs"
    lab.nl.set_features(reply_supported=True)
    so = lab.created(name, size=96 << 20, hw_max_sectors=256, control="hw_block_size=4096")
    hba, cfs = hba_of(so), lab.cfs
    assert cfs.device_path(hba, name) == so.path
    assert cfs.hw_block_size(hba, name) == 4096
    assert cfs.size(hba, name) == 96 << 20
    assert cfs.hw_max_sectors(hba, name) == 256
    assert cfs.unit_serial(hba, name) == so.wwn
    assert cfs.emulate_write_cache(hba, name) is False
    assert cfs.cmd_time_out(hba, name) == 30
    assert cfs.tmr_notification(hba, name) is False  # present on 6.1, off by default
    assert cfs.alua_groups(hba, name) == []  # only default_tg_pt_gp, which is ignored

    os.mkdir(os.path.join(so.path, "alua", "grp_b"))
    try:
        assert cfs.alua_groups(hba, name) == []  # no tg_pt_gp_id yet
        cfs.write(hba, name, "alua/grp_b/tg_pt_gp_id", "5")
        cfs.write(hba, name, "alua/grp_b/alua_access_type", "1")
        (group,) = cfs.alua_groups(hba, name)
        assert (group.name, group.tg_pt_gp_id, group.alua_access_type) == ("grp_b", 5, "Implicit")
        assert group.alua_access_state == 0 and group.members == ()
    finally:
        os.rmdir(os.path.join(so.path, "alua", "grp_b"))

    cfs.block_dev(hba, name, True)
    cfs.reset_ring(hba, name, 1)
    cfs.reset_ring(hba, name, 2)
    cfs.block_dev(hba, name, False)
    with pytest.raises(ConfigFSError) as err:
        cfs.write(hba, name, "action/reset_ring", "7")
    assert err.value.errno == errno.EINVAL and err.value.filename.endswith("action/reset_ring")
    lab.deleted(name)


def test_block_and_reset_netlink_release_a_waiter_nobody_answers(lab: KernelLab) -> None:
    name = NAME_PREFIX + "orphan"
    lab.nl.set_features(reply_supported=True)
    creating = lab.create(name)
    ev = lab.next_event(TcmuCmd.ADDED_DEVICE, name)  # received, deliberately never answered
    time.sleep(STILL_BLOCKED_S)
    assert not creating.done(), "the creator should hang until someone answers"

    lab.cfs.set_block_netlink(True)
    assert lab.cfs.block_netlink() is True
    lab.cfs.reset_netlink()
    # The waiter gets -EINTR; rtslib's retried write then meets the blocked interface and
    # reports -EAGAIN (the raw test above sees the EINTR itself).
    with pytest.raises(OSError) as err:
        creating.result(30)
    assert err.value.errno in (errno.EINTR, errno.EAGAIN)
    # The waiter is gone: a late reply now matches nothing.
    assert lab.nl.reply(ev, 0) == errno.ENODEV

    # While blocked, a new device fails at once instead of waiting.
    refused = lab.create(NAME_PREFIX + "while-blocked")
    with pytest.raises(OSError) as err:
        refused.result(30)
    assert err.value.errno == errno.EAGAIN

    lab.cfs.set_block_netlink(False)
    assert lab.cfs.block_netlink() is False
    assert not any(i.dev_name.startswith(NAME_PREFIX) for i in scan())


def test_a_dead_listener_leaves_creators_hanging_until_reset(lab: KernelLab) -> None:
    # The reply flag is module-wide and outlives the socket that set it: once the daemon is
    # gone, ADDED_DEVICE still waits (the kernel waits on an add even with no listener).
    name = NAME_PREFIX + "dead-runner"
    lab.nl.set_features(reply_supported=True)
    lab.nl.close()
    creating = lab.create(name)
    time.sleep(3 * STILL_BLOCKED_S)
    assert not creating.done(), "the creator should hang with nobody listening"
    lab.release_waiters(creating)
    with pytest.raises(OSError) as err:
        creating.result(0)
    assert err.value.errno in (errno.EINTR, errno.EAGAIN)
    lab.nl.open()  # for the fixture's teardown, which turns the flag off again


def test_removal_sends_removed_device_and_completes_on_reply(lab: KernelLab) -> None:
    name = NAME_PREFIX + "removed"
    lab.nl.set_features(reply_supported=True)
    creating = lab.create(name)
    added = lab.next_event(TcmuCmd.ADDED_DEVICE, name)
    lab.nl.reply(added, 0)
    creating.result(30)

    deleting = lab.delete(name)
    ev = lab.next_event(TcmuCmd.REMOVED_DEVICE, name)
    assert (ev.device, ev.minor, ev.device_id) == (added.device, added.minor, added.device_id)
    time.sleep(STILL_BLOCKED_S)
    assert not deleting.done(), "the kernel did not wait for REMOVED_DEVICE_DONE"
    assert lab.nl.reply(ev, 0) == 0
    deleting.result(30)
    assert not any(i.dev_name == name for i in scan())


def test_reconfig_of_a_live_device_carries_the_changed_value(lab: KernelLab) -> None:
    name = NAME_PREFIX + "reconfig"
    lab.nl.set_features(reply_supported=True)
    so = lab.created(name)
    hba = hba_of(so)
    resize = in_background(lambda: lab.cfs.write(hba, name, "attrib/dev_size", str(128 << 20)), "resize")
    ev = lab.next_event(TcmuCmd.RECONFIG_DEVICE, name)
    assert ev.dev_size == 128 << 20 and ev.dev_cfg is None and ev.write_cache is None
    assert lab.nl.reply(ev, 0) == 0
    resize.result(30)
    assert lab.cfs.size(hba, name) == 128 << 20

    wce = in_background(lambda: lab.cfs.write(hba, name, "attrib/emulate_write_cache", "1"), "wce")
    ev = lab.next_event(TcmuCmd.RECONFIG_DEVICE, name)
    assert ev.write_cache is True
    assert lab.nl.reply(ev, -errno.EOPNOTSUPP) == 0
    with pytest.raises(ConfigFSError):  # a refused reconfig fails the configfs write
        wce.result(30)
    assert lab.cfs.emulate_write_cache(hba, name) is False
    lab.deleted(name)


def test_udev_monitor_reports_uio_add_and_remove(lab: KernelLab) -> None:
    name = NAME_PREFIX + "udev"
    monitor = UioMonitor(source="kernel")  # the guest runs no udevd
    monitor.start()
    try:
        lab.created(name)
        (info,) = [i for i in scan() if i.dev_name == name]
        seen = _wait_uio(monitor, "add", info.minor)
        assert seen.sys_name == f"uio{info.minor}"
        lab.deleted(name)
        _wait_uio(monitor, "remove", info.minor)
    finally:
        monitor.close()


def _wait_uio(monitor: UioMonitor, action: str, minor: int, timeout: float = 30.0) -> UioEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([monitor], [], [], 0.5)
        for ev in monitor.poll():
            if ev.action == action and ev.minor == minor:
                return ev
    raise AssertionError(f"no uio {action} for minor {minor} within {timeout}s")
