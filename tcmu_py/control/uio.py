"""uio discovery: which ``/dev/uioN`` belongs to which TCMU device, and how big its map is.

target_core_user registers one uio device per enabled backstore, named
``tcm-user/<hba>/<dev_name>/<dev_config>`` (reference/tcmu.md §1.9). A sysfs scan finds the
devices that already exist (a restarted daemon re-attaches them); a pyudev monitor reports
uio add/remove as a second signal next to netlink. Both work on an injectable root, so the
unit tests run against a fake tree.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Final

UIO_NAME_PREFIX: Final = "tcm-user/"
_UIO_DIR = re.compile(r"uio(\d+)\Z")


@dataclass(frozen=True)
class UioName:
    """The parts of a TCMU uio name."""

    hba: int
    dev_name: str
    cfgstring: str  # dev_config, e.g. "rbd/pool/image" or "file//path"; may be empty

    @property
    def subtype(self) -> str:
        """The handler name: the text before the first ``/`` (how tcmu-runner matches)."""
        return self.cfgstring.split("/", 1)[0]


@dataclass(frozen=True)
class UioInfo:
    """One TCMU uio device as sysfs describes it."""

    minor: int
    hba: int
    dev_name: str
    cfgstring: str
    subtype: str
    map_size: int  # mmap exactly this many bytes, or the kernel answers EINVAL
    dev_path: str  # /dev/uio<minor>
    name: str  # the raw uio name


def parse_uio_name(name: str) -> UioName | None:
    """Split ``tcm-user/<hba>/<dev_name>[/<dev_config>]``; None for any other uio device.

    dev_config is everything after the third ``/`` and may itself hold ``/`` and ``;``.
    """
    if not name.startswith(UIO_NAME_PREFIX):
        return None
    parts = name[len(UIO_NAME_PREFIX) :].split("/", 2)
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1]:
        return None
    return UioName(hba=int(parts[0]), dev_name=parts[1], cfgstring=parts[2] if len(parts) > 2 else "")


def read_uio(uio_dir: str, dev_root: str = "/dev") -> UioInfo | None:
    """The TCMU device behind one ``/sys/class/uio/uioN`` directory, or None.

    None also when the device vanished while being read: removal races with every scan.
    """
    m = _UIO_DIR.match(os.path.basename(uio_dir.rstrip("/")))
    if m is None:
        return None
    try:
        with open(os.path.join(uio_dir, "name"), encoding="utf-8", errors="surrogateescape") as f:
            name = f.read().rstrip("\n")
        parsed = parse_uio_name(name)
        if parsed is None:
            return None
        with open(os.path.join(uio_dir, "maps", "map0", "size"), encoding="ascii") as f:
            map_size = int(f.read().strip(), 0)  # "0x0000000040800000"
    except FileNotFoundError:
        return None
    minor = int(m.group(1))
    return UioInfo(
        minor=minor,
        hba=parsed.hba,
        dev_name=parsed.dev_name,
        cfgstring=parsed.cfgstring,
        subtype=parsed.subtype,
        map_size=map_size,
        dev_path=os.path.join(dev_root, f"uio{minor}"),
        name=name,
    )


def scan(sysfs_root: str = "/sys/class/uio", dev_root: str = "/dev") -> list[UioInfo]:
    """Every TCMU uio device present now, by minor. Missing ``sysfs_root`` means none."""
    try:
        entries = os.listdir(sysfs_root)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        info = read_uio(os.path.join(sysfs_root, entry), dev_root)
        if info is not None:
            found.append(info)
    return sorted(found, key=lambda i: i.minor)


def find(hba: int, dev_name: str, sysfs_root: str = "/sys/class/uio") -> UioInfo | None:
    """The uio device of configfs device ``user_<hba>/<dev_name>``, if it is enabled."""
    for info in scan(sysfs_root):
        if info.hba == hba and info.dev_name == dev_name:
            return info
    return None


@dataclass(frozen=True)
class UioEvent:
    """A uio device appeared (``add``) or went away (``remove``)."""

    action: str
    minor: int
    sys_name: str


class UioMonitor:
    """uio add/remove from the kernel's uevents, through pyudev, for an asyncio reader.

    ``source="udev"`` (the default) hears events after udevd has processed them, so the
    ``/dev`` node is ready. ``source="kernel"`` hears the raw kernel uevent and works where no
    udevd runs (the test guest). Neither says which TCMU device it is: read the sysfs name
    on ``add`` with ``read_uio``.
    """

    def __init__(self, source: str = "udev") -> None:
        import pyudev  # imported here so the rest of the module works without libudev

        self.source = source
        self._context = pyudev.Context()
        self._monitor: Any = pyudev.Monitor.from_netlink(self._context, source=source)
        self._monitor.filter_by("uio")
        self._started = False

    def start(self) -> None:
        """Start receiving; events before this call are not seen (scan after starting)."""
        if not self._started:
            self._monitor.start()
            self._started = True

    def fileno(self) -> int:
        return int(self._monitor.fileno())

    def poll(self) -> list[UioEvent]:
        """Every queued uio event, without blocking."""
        self.start()
        events: list[UioEvent] = []
        while True:
            device = self._monitor.poll(timeout=0)
            if device is None:
                return events
            # libudev's filter does not apply to raw kernel uevents: filter here too.
            m = _UIO_DIR.match(device.sys_name or "")
            if device.subsystem != "uio" or m is None or device.action not in ("add", "remove"):
                continue
            events.append(UioEvent(action=device.action, minor=int(m.group(1)), sys_name=device.sys_name))

    def close(self) -> None:
        # pyudev has no explicit close; dropping the monitor closes its socket.
        self._monitor = None
        self._started = False
