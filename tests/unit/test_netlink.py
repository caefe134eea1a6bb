"""TCM-USER and generic netlink encoding/decoding, checked against hand-built kernel-layout bytes.

The helpers here build bytes with plain ``struct`` the way the kernel lays them out, so the
codec is not only checked against itself.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from tcmu_py.control import genl
from tcmu_py.control.netlink import (
    FamilyNotFoundError,
    ModuleLoadError,
    NetlinkEvent,
    TcmuCmd,
    TcmuNetlink,
    encode_reply,
    encode_set_features,
    load_module,
    parse_event,
)

FAMILY = 0x1F  # whatever id the kernel handed out; only consistency matters here


def nla(attr_type: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes like the kernel's nla_put()."""
    raw = struct.pack("<HH", 4 + len(payload), attr_type) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(
    msg_type: int, cmd: int, attrs: bytes, seq: int = 0, pid: int = 0, version: int = 2, flags: int = 0
) -> bytes:
    body = struct.pack("<BBH", cmd, version, 0) + attrs
    return struct.pack("<IHHII", 16 + len(body), msg_type, flags, seq, pid) + body


def kernel_event(cmd: int, attrs: bytes) -> bytes:
    """A multicast message as tcmu_netlink_event_init() builds it: portid 0, seq 0, version 2."""
    return message(FAMILY, cmd, attrs)


def one_event(data: bytes) -> NetlinkEvent | None:
    (msg,) = genl.split(data)
    return parse_event(msg, FAMILY)


def ids(minor: int, device_id: int) -> bytes:
    return nla(2, struct.pack("<I", minor)) + nla(8, struct.pack("<I", device_id))


def test_added_device_event_decodes_from_kernel_bytes() -> None:
    data = kernel_event(1, nla(1, b"tcm-user/0/d0/ram/x;a=b/c\0") + ids(3, 17))
    assert one_event(data) == NetlinkEvent(
        cmd=TcmuCmd.ADDED_DEVICE, device="tcm-user/0/d0/ram/x;a=b/c", minor=3, device_id=17
    )


def test_reconfig_dev_size_after_a_pad_attribute_decodes() -> None:
    # nla_put_u64_64bit() may put an empty PAD attribute first to align the u64.
    attrs = nla(1, b"tcm-user/1/big/file//f\0") + ids(0, 2) + nla(3, b"") + nla(5, struct.pack("<Q", 5 << 40))
    event = one_event(kernel_event(3, attrs))
    assert event is not None
    assert (event.cmd, event.dev_size, event.dev_cfg, event.write_cache) == (
        TcmuCmd.RECONFIG_DEVICE,
        5 << 40,
        None,
        None,
    )


def test_reconfig_write_cache_and_dev_cfg() -> None:
    base = nla(1, b"tcm-user/1/d/ram/\0") + ids(0, 2)
    wce = one_event(kernel_event(3, base + nla(6, b"\x01")))
    cfg = one_event(kernel_event(3, base + nla(4, b"ram/new\0")))
    assert wce is not None and wce.write_cache is True
    assert cfg is not None and cfg.dev_cfg == "ram/new"


def test_messages_that_are_not_events_are_ignored() -> None:
    assert one_event(kernel_event(4, nla(7, struct.pack("<i", 0)))) is None  # a *_DONE
    assert one_event(message(FAMILY + 1, 1, b"")) is None  # another family
    assert one_event(struct.pack("<IHHII", 16, FAMILY, 0, 0, 0)) is None  # no genl header


@pytest.mark.parametrize(
    ("cmd", "done"),
    [
        (TcmuCmd.ADDED_DEVICE, TcmuCmd.ADDED_DEVICE_DONE),
        (TcmuCmd.REMOVED_DEVICE, TcmuCmd.REMOVED_DEVICE_DONE),
        (TcmuCmd.RECONFIG_DEVICE, TcmuCmd.RECONFIG_DEVICE_DONE),
    ],
)
def test_reply_is_the_matching_done_with_status_and_device_id(cmd: TcmuCmd, done: TcmuCmd) -> None:
    event = NetlinkEvent(cmd=cmd, device="tcm-user/0/d0/ram/", minor=0, device_id=42)
    data = encode_reply(FAMILY, event, -errno.EINVAL, seq=9, pid=1234)
    attrs = nla(7, struct.pack("<i", -errno.EINVAL)) + nla(8, struct.pack("<I", 42))
    # NLM_F_REQUEST | NLM_F_ACK: the kernel then tells us whether a waiter matched.
    assert data == message(FAMILY, done, attrs, seq=9, pid=1234, flags=1 | 4)


def test_set_features_carries_the_u8_flag() -> None:
    data = encode_set_features(FAMILY, True, seq=1, pid=0)
    assert struct.unpack_from("<HH", data, 4) == (FAMILY, 1 | 4)
    assert struct.unpack_from("<BB", data, 16) == (TcmuCmd.SET_FEATURES, 2)
    assert data[20:] == nla(9, b"\x01")
    assert encode_set_features(FAMILY, False, seq=1, pid=0)[20:] == nla(9, b"\x00")


def test_acks_and_errors() -> None:
    def ack(error: int, seq: int) -> bytes:
        # nlmsgerr: the error code, then the request it answers (its header at least).
        body = struct.pack("<i", error) + struct.pack("<IHHII", 16, FAMILY, 5, seq, 0)
        return struct.pack("<IHHII", 16 + len(body), genl.NLMSG_ERROR, 0, seq, 77) + body

    ok, nodev, event = genl.split(ack(0, 3) + ack(-errno.ENODEV, 4) + kernel_event(1, b""))
    assert (genl.ack_errno(ok), ok.seq) == (0, 3)
    assert (genl.ack_errno(nodev), nodev.seq) == (errno.ENODEV, 4)
    assert genl.ack_errno(event) is None


def test_split_drops_a_truncated_tail() -> None:
    whole = kernel_event(1, nla(1, b"tcm-user/0/a/ram/\0"))
    assert len(genl.split(whole + whole[:10])) == 1
    assert genl.split(struct.pack("<IHHII", 400, FAMILY, 0, 0, 0)) == []


def test_attributes_are_padded_and_parsed_back() -> None:
    raw = genl.nla_str(1, "abc") + genl.nla_u8(6, 1) + genl.nla_u64(5, 1 << 40) + genl.nla_s32(7, -5)
    assert raw == nla(1, b"abc\0") + nla(6, b"\x01") + nla(5, struct.pack("<Q", 1 << 40)) + nla(
        7, struct.pack("<i", -5)
    )
    attrs = genl.attr_map(raw)
    assert genl.get_str(attrs[1]) == "abc"
    assert (genl.get_uint(attrs[6]), genl.get_uint(attrs[5]), genl.get_s32(attrs[7])) == (1, 1 << 40, -5)


def test_nested_flag_bits_are_masked_off_the_type() -> None:
    assert genl.parse_attrs(nla(0x8000 | 7, b"")) == [(7, b"")]


def test_family_lookup_request_and_answer() -> None:
    request = genl.getfamily_request("TCM-USER", seq=5, pid=99)
    assert request == message(0x10, 3, nla(2, b"TCM-USER\0"), seq=5, pid=99, version=1, flags=1 | 4)

    # CTRL_CMD_NEWFAMILY as nlctrl sends it: id, name, version, nested multicast groups.
    group = nla(1, nla(2, struct.pack("<I", 9)) + nla(1, b"config\0"))
    answer = message(
        0x10,
        1,
        nla(1, struct.pack("<H", 32))
        + nla(2, b"TCM-USER\0")
        + nla(3, struct.pack("<I", 2))
        + nla(0x8000 | 7, group),
        seq=5,
    )
    (msg,) = genl.split(answer)
    assert genl.parse_family(msg) == genl.Family(id=32, version=2, groups={"config": 9})
    (not_ctrl,) = genl.split(kernel_event(1, b""))
    assert genl.parse_family(not_ctrl) is None


def kernel_has_tcm_user() -> bool:
    return os.path.isdir("/sys/module/target_core_user")


@pytest.mark.skipif(kernel_has_tcm_user(), reason="target_core_user is loaded: the kernel tier covers it")
def test_opening_without_the_module_says_what_to_load() -> None:
    # A real netlink socket: the host kernel's nlctrl answers that TCM-USER does not exist.
    nl = TcmuNetlink(timeout=2.0)
    with pytest.raises(FamilyNotFoundError, match="modprobe target_core_user"):
        nl.open()
    with pytest.raises(OSError, match="not open"):
        nl.fileno()


def test_load_module_failure_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModuleLoadError, match="cannot load tcmu_py_no_such_module"):
        load_module("tcmu_py_no_such_module", sys_module=str(tmp_path), timeout=30)


def test_load_module_skips_modprobe_when_sysfs_shows_the_module(tmp_path: Path) -> None:
    (tmp_path / "tcmu_py_no_such_module").mkdir()
    load_module("tcmu_py_no_such_module", sys_module=str(tmp_path))
