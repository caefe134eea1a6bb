"""configfs and module parameters of target_core_user: device attributes and recovery actions.

Layout (reference/tcmu.md §1.13): ``<root>/user_<hba>/<dev>/{info,attrib/,action/,wwn/,alua/}``
and ``/sys/module/target_core_user/parameters/{block_netlink,reset_netlink}`` (§1.12). Both
roots are injectable so unit tests run against a temporary tree.

Every write runs in a helper thread joined with a timeout: once replies are enabled, a write
that makes the kernel send a netlink event (or any write behind one) can sleep forever in D
state if the daemon that got the event died. The thread then leaks, but the caller gets a
clear error instead of hanging with it.
"""

from __future__ import annotations

import errno
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Final

DEFAULT_ROOT: Final = "/sys/kernel/config/target/core"
DEFAULT_PARAMS_ROOT: Final = "/sys/module/target_core_user/parameters"
UNIT_SERIAL_PREFIX: Final = "T10 VPD Unit Serial Number:"
_SIZE_FIELD = re.compile(r"(?:^|\s)Size: (\d+)")


class ConfigFSError(OSError):
    """A configfs or module-parameter file could not be read or written (names the path)."""


class ConfigFSTimeoutError(ConfigFSError):
    """A write did not finish in time: typically a netlink waiter nobody will answer."""


@dataclass(frozen=True)
class AluaGroup:
    """One target port group under ``alua/`` (tcmu-runner's ``struct alua_grp``)."""

    name: str
    tg_pt_gp_id: int
    alua_access_state: int  # 0 active/optimized ... 0xf transitioning (SPC-4 values)
    alua_access_status: str
    alua_access_type: str  # "None", "Implicit", "Explicit" or "Implicit and Explicit"
    preferred: bool
    implicit_trans_secs: int
    nonop_delay_msecs: int
    trans_delay_msecs: int
    supported_states: dict[str, bool] = field(default_factory=dict)  # alua_support_* files
    members: tuple[str, ...] = ()  # "fabric/wwn/tpgt_N/lun_M"


def bounded_write(path: str, value: str, timeout: float) -> None:
    """Write ``value`` to a sysfs/configfs file in one ``write()``, giving up after ``timeout``.

    Unbuffered on purpose: a Python text file re-issues a failed write from ``close()``
    (rtslib's ``fwrite`` does, so the kernel sees a second ``enable``). Python does still
    retry a write that failed with EINTR (PEP 475); see ``ConfigFS.reset_netlink``.
    """
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # as `echo >` does
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome.append(e)

    worker = threading.Thread(target=work, name=f"configfs-write {path}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise ConfigFSTimeoutError(
            errno.ETIMEDOUT,
            f"writing {value.strip()!r} did not finish in {timeout}s: a netlink waiter may be "
            "pending (write 1 to block_netlink, then 1 to reset_netlink)",
            path,
        )
    err = outcome[0]
    if isinstance(err, OSError):
        raise ConfigFSError(err.errno, f"cannot write {value.strip()!r}: {err.strerror}", path)
    if err is not None:
        raise err


def read_text(path: str) -> str:
    """The content of a sysfs/configfs file, or ConfigFSError naming the path."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError as e:
        raise ConfigFSError(e.errno, f"cannot read: {e.strerror}", path) from e


def parse_info_size(info: str) -> int:
    """The `` Size: N`` field of a TCMU ``info`` file.

    The config string comes before it and may itself contain " Size: ", so the last field
    wins; "SectorSize:" does not match because of the leading blank.
    """
    matches = _SIZE_FIELD.findall(info)
    if not matches:
        raise ValueError(f"no ' Size: ' field in {info!r}")
    return int(matches[-1])


def strip_unit_serial(text: str) -> str:
    """``wwn/vpd_unit_serial`` reads "T10 VPD Unit Serial Number: <serial>"; keep the serial."""
    text = text.strip()
    if text.startswith(UNIT_SERIAL_PREFIX):
        text = text[len(UNIT_SERIAL_PREFIX) :]
    return text.strip()


class ConfigFS:
    """The configfs side of TCMU devices, addressed by (hba, device name) as in the uio name."""

    def __init__(
        self,
        root: str = DEFAULT_ROOT,
        params_root: str = DEFAULT_PARAMS_ROOT,
        *,
        write_timeout: float = 10.0,
    ) -> None:
        self.root = root
        self.params_root = params_root
        self.write_timeout = write_timeout

    def device_path(self, hba: int, name: str) -> str:
        return os.path.join(self.root, f"user_{hba}", name)

    def exists(self, hba: int, name: str, rel: str = "") -> bool:
        """Whether the device (or one of its files) exists: old kernels lack newer attributes."""
        return os.path.exists(os.path.join(self.device_path(hba, name), rel))

    # ---- reads -------------------------------------------------------------------------

    def read(self, hba: int, name: str, rel: str) -> str:
        """One file of the device, stripped (e.g. ``rel="attrib/hw_block_size"``)."""
        return read_text(os.path.join(self.device_path(hba, name), rel)).strip()

    def read_int(self, hba: int, name: str, rel: str) -> int:
        text = self.read(hba, name, rel)
        try:
            return int(text, 0)
        except ValueError as e:
            path = os.path.join(self.device_path(hba, name), rel)
            raise ConfigFSError(errno.EINVAL, f"not an integer: {text!r}", path) from e

    def hw_block_size(self, hba: int, name: str) -> int:
        return self.read_int(hba, name, "attrib/hw_block_size")

    def hw_max_sectors(self, hba: int, name: str) -> int:
        return self.read_int(hba, name, "attrib/hw_max_sectors")

    def size(self, hba: int, name: str) -> int:
        """The device size in bytes, from ``info`` (as tcmu-runner reads it)."""
        text = self.read(hba, name, "info")
        try:
            return parse_info_size(text)
        except ValueError as e:
            raise ConfigFSError(
                errno.EINVAL, str(e), os.path.join(self.device_path(hba, name), "info")
            ) from e

    def unit_serial(self, hba: int, name: str) -> str:
        """The T10 unit serial (VPD 0x80, and the base of the NAA in VPD 0x83)."""
        return strip_unit_serial(self.read(hba, name, "wwn/vpd_unit_serial"))

    def emulate_write_cache(self, hba: int, name: str) -> bool:
        return self.read_int(hba, name, "attrib/emulate_write_cache") != 0

    def cmd_time_out(self, hba: int, name: str) -> int:
        return self.read_int(hba, name, "attrib/cmd_time_out")

    def tmr_notification(self, hba: int, name: str) -> bool | None:
        """None on kernels without TMR notification (before ~5.9)."""
        if not self.exists(hba, name, "attrib/tmr_notification"):
            return None
        return self.read_int(hba, name, "attrib/tmr_notification") != 0

    def alua_groups(self, hba: int, name: str) -> list[AluaGroup]:
        """The device's ALUA target port groups, sorted by id, without ``default_tg_pt_gp``."""
        alua_dir = os.path.join(self.device_path(hba, name), "alua")
        try:
            entries = sorted(os.listdir(alua_dir))
        except OSError as e:
            raise ConfigFSError(e.errno, f"cannot list: {e.strerror}", alua_dir) from e
        groups = []
        for entry in entries:
            if entry == "default_tg_pt_gp" or not os.path.isdir(os.path.join(alua_dir, entry)):
                continue
            group = self._alua_group(os.path.join(alua_dir, entry), entry)
            if group is not None:
                groups.append(group)
        return sorted(groups, key=lambda g: g.tg_pt_gp_id)

    def _alua_group(self, path: str, group: str) -> AluaGroup | None:
        """One group, or None while it has no tg_pt_gp_id yet (mkdir comes before the id)."""

        def text(attr: str) -> str:
            return read_text(os.path.join(path, attr)).strip()

        def number(attr: str) -> int:
            value = text(attr)
            try:
                return int(value, 0)
            except ValueError as e:
                raise ConfigFSError(
                    errno.EINVAL, f"not an integer: {value!r}", os.path.join(path, attr)
                ) from e

        if not text("tg_pt_gp_id"):
            return None
        supported = {
            f[len("alua_support_") :]: number(f) != 0
            for f in sorted(os.listdir(path))
            if f.startswith("alua_support_")
        }
        return AluaGroup(
            name=group,
            tg_pt_gp_id=number("tg_pt_gp_id"),
            alua_access_state=number("alua_access_state"),
            alua_access_status=text("alua_access_status"),
            alua_access_type=text("alua_access_type"),
            preferred=number("preferred") != 0,
            implicit_trans_secs=number("implicit_trans_secs"),
            nonop_delay_msecs=number("nonop_delay_msecs"),
            trans_delay_msecs=number("trans_delay_msecs"),
            supported_states=supported,
            members=tuple(line for line in text("members").splitlines() if line),
        )

    # ---- writes (bounded) ----------------------------------------------------------------

    def write(self, hba: int, name: str, rel: str, value: str) -> None:
        """Write one attribute or action of the device, bounded by ``write_timeout``."""
        bounded_write(os.path.join(self.device_path(hba, name), rel), value, self.write_timeout)

    def block_dev(self, hba: int, name: str, block: bool) -> None:
        """Block (queue new commands) or unblock the device's ring (``action/block_dev``)."""
        self.write(hba, name, "action/block_dev", "1" if block else "0")

    def reset_ring(self, hba: int, name: str, mode: int = 1) -> None:
        """Reset the ring; in-flight commands fail with BUSY (1) or CHECK CONDITION (2)."""
        if mode not in (1, 2):
            raise ValueError(f"reset_ring mode must be 1 or 2, not {mode!r}")
        self.write(hba, name, "action/reset_ring", str(mode))

    # ---- module parameters -----------------------------------------------------------------

    def block_netlink(self) -> bool:
        """Whether netlink requests are blocked (the kernel prints "blocked"/"unblocked")."""
        text = read_text(os.path.join(self.params_root, "block_netlink")).strip()
        return text in ("blocked", "1", "Y")

    def set_block_netlink(self, block: bool) -> None:
        """While blocked, new devices fail at once instead of waiting for a reply."""
        bounded_write(
            os.path.join(self.params_root, "block_netlink"),
            "1" if block else "0",
            self.write_timeout,
        )

    def reset_netlink(self) -> None:
        """Complete every pending netlink waiter with -EINTR (only while blocked).

        Keep block_netlink set until the released writers are gone: a writer that retries
        on EINTR (Python always does, PEP 475) would otherwise start a fresh wait.
        """
        bounded_write(os.path.join(self.params_root, "reset_netlink"), "1", self.write_timeout)
