"""uio discovery against a fake /sys/class/uio tree (contents copied from the guest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tcmu_py.control.uio import UioName, find, parse_uio_name, read_uio, scan

MAP_1G_8M = "0x0000000040800000\n"  # what a 6.1 kernel prints for the default map


def add_uio(root: Path, minor: int, name: str, size: str = MAP_1G_8M) -> None:
    d = root / f"uio{minor}"
    (d / "maps" / "map0").mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "version").write_text("2\n")
    (d / "maps" / "map0" / "size").write_text(size)
    (d / "maps" / "map0" / "name").write_text("tcm-user command & data buffer\n")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tcm-user/0/d0/ram/x;a=b/c", UioName(0, "d0", "ram/x;a=b/c")),
        (
            "tcm-user/12/img/rbd/pool/image;osd_op_timeout=30",
            UioName(12, "img", "rbd/pool/image;osd_op_timeout=30"),
        ),
        ("tcm-user/1/f/file//var/lib/a b.img", UioName(1, "f", "file//var/lib/a b.img")),
        ("tcm-user/4/bare", UioName(4, "bare", "")),
        ("tcm-user/4/bare/", UioName(4, "bare", "")),
    ],
)
def test_parse_uio_name(name: str, expected: UioName) -> None:
    assert parse_uio_name(name) == expected


@pytest.mark.parametrize("name", ["uio_pci_generic", "tcm-user/", "tcm-user/x/d0/ram/", "tcm-user/1//ram/x"])
def test_names_that_are_not_tcmu_devices(name: str) -> None:
    assert parse_uio_name(name) is None


def test_subtype_is_the_text_before_the_first_slash() -> None:
    assert UioName(0, "d", "file//tmp/f").subtype == "file"
    assert UioName(0, "d", ";tcmur_cmd_time_out=5;rbd/p/i").subtype == ";tcmur_cmd_time_out=5;rbd"
    assert UioName(0, "d", "").subtype == ""


def test_scan_finds_tcmu_devices_by_minor_and_ignores_others(tmp_path: Path) -> None:
    add_uio(tmp_path, 10, "tcm-user/2/b/file//srv/b.img", size="0x0000000000900000\n")
    add_uio(tmp_path, 0, "tcm-user/0/d0/ram/x;a=b/c")
    add_uio(tmp_path, 3, "uio_pci_generic")
    (tmp_path / "not-a-uio").mkdir()
    found = scan(str(tmp_path), dev_root="/dev")
    assert [i.minor for i in found] == [0, 10]
    d0, b = found
    assert (d0.hba, d0.dev_name, d0.cfgstring, d0.subtype) == (0, "d0", "ram/x;a=b/c", "ram")
    assert d0.map_size == (1 << 30) + (8 << 20)
    assert d0.dev_path == "/dev/uio0"
    assert d0.name == "tcm-user/0/d0/ram/x;a=b/c"
    assert (b.subtype, b.cfgstring, b.map_size, b.dev_path) == (
        "file",
        "file//srv/b.img",
        9 << 20,
        "/dev/uio10",
    )


def test_scan_of_a_missing_class_directory_is_empty(tmp_path: Path) -> None:
    assert scan(str(tmp_path / "absent")) == []


def test_a_device_removed_mid_scan_is_skipped(tmp_path: Path) -> None:
    add_uio(tmp_path, 1, "tcm-user/0/d1/ram/")
    (tmp_path / "uio1" / "maps" / "map0" / "size").unlink()
    assert read_uio(str(tmp_path / "uio1")) is None
    assert scan(str(tmp_path)) == []


def test_find_by_hba_and_name(tmp_path: Path) -> None:
    add_uio(tmp_path, 0, "tcm-user/0/d0/ram/")
    add_uio(tmp_path, 1, "tcm-user/1/d0/ram/")
    hit = find(1, "d0", str(tmp_path))
    assert hit is not None and hit.minor == 1
    assert find(2, "d0", str(tmp_path)) is None


def test_the_monitor_is_a_non_blocking_reader_for_an_event_loop() -> None:
    from tcmu_py.control.uio import UioMonitor

    monitor = UioMonitor(source="kernel")  # a real uevent socket; no udevd needed
    try:
        monitor.start()
        assert isinstance(monitor.fileno(), int) and monitor.fileno() >= 0
        assert monitor.poll() == []  # nothing queued: returns at once instead of waiting
    finally:
        monitor.close()
