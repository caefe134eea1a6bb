"""ConfigFS against a temporary tree shaped like a 6.1 kernel's (contents copied from the guest)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from tcmu_py.control.configfs import (
    ConfigFS,
    ConfigFSError,
    ConfigFSTimeoutError,
    bounded_write,
    parse_info_size,
    strip_unit_serial,
)

# What `cat info` printed in the guest for user:ram with dev_config "ram/x;a=b/c", 64 MiB.
INFO_6_1 = (
    "Status: DEACTIVATED  Max Queue Depth: 0  SectorSize: 512  HwMaxSectors: 256\n"
    "        Config: ram/x;a=b/c Size: 67108864 MaxDataAreaMB: 1024 DataPagesPerBlk: 1 "
    "CmdRingSizeMB: 8\n"
)
SERIAL = "3137abcb-d933-40c7-b160-8430fe2fe6bb"
ALUA_GROUP = {
    "alua_access_state": "0\n",
    "alua_access_status": "None\n",
    "alua_access_type": "Implicit\n",
    "alua_support_active_nonoptimized": "1\n",
    "alua_support_active_optimized": "1\n",
    "alua_support_lba_dependent": "0\n",
    "alua_support_offline": "1\n",
    "alua_support_standby": "1\n",
    "alua_support_transitioning": "1\n",
    "alua_support_unavailable": "1\n",
    "alua_write_metadata": "0\n",
    "implicit_trans_secs": "0\n",
    "members": "",
    "nonop_delay_msecs": "100\n",
    "preferred": "0\n",
    "tg_pt_gp_id": "0\n",
    "trans_delay_msecs": "0\n",
}


def write_tree(base: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def cfs(tmp_path: Path) -> ConfigFS:
    dev = tmp_path / "core" / "user_3" / "disk0"
    write_tree(
        dev,
        {
            "info": INFO_6_1,
            "attrib/hw_block_size": "4096\n",
            "attrib/hw_max_sectors": "256\n",
            "attrib/emulate_write_cache": "1\n",
            "attrib/cmd_time_out": "30\n",
            "attrib/tmr_notification": "0\n",
            "wwn/vpd_unit_serial": f"T10 VPD Unit Serial Number: {SERIAL}\n",
            "action/block_dev": "",
            "action/reset_ring": "",
        },
    )
    write_tree(dev / "alua" / "default_tg_pt_gp", ALUA_GROUP)
    write_tree(
        dev / "alua" / "ao",
        {**ALUA_GROUP, "tg_pt_gp_id": "7\n", "members": "iSCSI/iqn.x/tpgt_1/lun_0\n"},
    )
    write_tree(
        dev / "alua" / "standby",
        {**ALUA_GROUP, "tg_pt_gp_id": "2\n", "alua_access_state": "2\n", "preferred": "1\n"},
    )
    write_tree(dev / "alua" / "half_made", {**ALUA_GROUP, "tg_pt_gp_id": ""})
    write_tree(tmp_path / "params", {"block_netlink": "unblocked\n", "reset_netlink": ""})
    return ConfigFS(str(tmp_path / "core"), str(tmp_path / "params"), write_timeout=2.0)


def test_device_path_is_user_hba_slash_name(cfs: ConfigFS) -> None:
    assert cfs.device_path(3, "disk0") == os.path.join(cfs.root, "user_3", "disk0")


def test_reads_the_attributes_tcmu_runner_reads_at_attach(cfs: ConfigFS) -> None:
    assert cfs.hw_block_size(3, "disk0") == 4096
    assert cfs.hw_max_sectors(3, "disk0") == 256
    assert cfs.size(3, "disk0") == 64 << 20
    assert cfs.emulate_write_cache(3, "disk0") is True
    assert cfs.cmd_time_out(3, "disk0") == 30
    assert cfs.tmr_notification(3, "disk0") is False


def test_unit_serial_loses_the_prefix_lio_prints(cfs: ConfigFS) -> None:
    assert cfs.unit_serial(3, "disk0") == SERIAL
    assert strip_unit_serial("plain-serial\n") == "plain-serial"


def test_tmr_notification_is_none_on_kernels_without_it(cfs: ConfigFS) -> None:
    os.remove(os.path.join(cfs.device_path(3, "disk0"), "attrib", "tmr_notification"))
    assert cfs.tmr_notification(3, "disk0") is None


def test_size_takes_the_real_field_even_if_the_config_mentions_size() -> None:
    info = "Status: ACTIVATED  SectorSize: 512\n  Config: file//a Size: 1 b Size: 4096 MaxDataAreaMB: 1\n"
    assert parse_info_size(info) == 4096
    assert parse_info_size("Config: NULL Size: 0\n") == 0
    with pytest.raises(ValueError):
        parse_info_size("Status: DEACTIVATED  SectorSize: 512\n")


def test_a_missing_file_names_its_path(cfs: ConfigFS) -> None:
    with pytest.raises(ConfigFSError) as err:
        cfs.hw_block_size(3, "nosuchdev")
    assert err.value.filename == os.path.join(cfs.root, "user_3", "nosuchdev", "attrib", "hw_block_size")
    assert "nosuchdev" in str(err.value)


def test_a_garbled_number_is_a_configfs_error(cfs: ConfigFS) -> None:
    Path(cfs.device_path(3, "disk0"), "attrib", "hw_block_size").write_text("lots\n")
    with pytest.raises(ConfigFSError, match="not an integer"):
        cfs.hw_block_size(3, "disk0")


def test_alua_groups_skip_the_default_group_and_groups_without_an_id(cfs: ConfigFS) -> None:
    groups = cfs.alua_groups(3, "disk0")
    assert [(g.name, g.tg_pt_gp_id) for g in groups] == [("standby", 2), ("ao", 7)]
    standby, ao = groups
    assert standby.alua_access_state == 2 and standby.preferred is True
    assert ao.alua_access_type == "Implicit"
    assert ao.alua_access_status == "None"
    assert ao.members == ("iSCSI/iqn.x/tpgt_1/lun_0",)
    assert ao.nonop_delay_msecs == 100
    assert ao.supported_states["active_optimized"] is True
    assert ao.supported_states["lba_dependent"] is False
    assert "write_metadata" not in ao.supported_states


def test_actions_write_exactly_what_the_kernel_expects(cfs: ConfigFS) -> None:
    action = Path(cfs.device_path(3, "disk0"), "action")
    cfs.block_dev(3, "disk0", True)
    assert (action / "block_dev").read_text() == "1"
    cfs.block_dev(3, "disk0", False)
    assert (action / "block_dev").read_text() == "0"
    cfs.reset_ring(3, "disk0", 2)
    assert (action / "reset_ring").read_text() == "2"
    with pytest.raises(ValueError):
        cfs.reset_ring(3, "disk0", 3)


def test_module_parameters(cfs: ConfigFS) -> None:
    params = Path(cfs.params_root)
    assert cfs.block_netlink() is False
    cfs.set_block_netlink(True)
    assert (params / "block_netlink").read_text() == "1"
    (params / "block_netlink").write_text("blocked\n")
    assert cfs.block_netlink() is True
    cfs.reset_netlink()
    assert (params / "reset_netlink").read_text() == "1"


def test_writing_a_missing_action_names_its_path(cfs: ConfigFS) -> None:
    with pytest.raises(ConfigFSError) as err:
        cfs.block_dev(3, "gone", True)
    assert err.value.filename.endswith(os.path.join("user_3", "gone", "action", "block_dev"))


def test_a_write_that_hangs_times_out_with_a_clear_error(tmp_path: Path) -> None:
    # A FIFO with no reader blocks open(O_WRONLY) forever, like a configfs write whose
    # netlink waiter is never answered.
    fifo = tmp_path / "stuck"
    os.mkfifo(fifo)
    with pytest.raises(ConfigFSTimeoutError, match="reset_netlink") as err:
        bounded_write(str(fifo), "1", timeout=0.2)
    assert err.value.filename == str(fifo)
    # Release the leaked writer thread so the test leaves nothing behind.
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    reader.join(5)
    assert got == [b"1"]
