"""The generic netlink family ``TCM-USER``: device events from the kernel, ``*_DONE`` replies.

The kernel multicasts ADDED/REMOVED/RECONFIG_DEVICE to the group ``config``; once a daemon
has sent SET_FEATURES with SUPP_KERN_CMD_REPLY=1, it also *waits* (without a timeout) for the
matching ``*_DONE`` reply before finishing the configfs write (reference/tcmu.md §1.12).

The socket is a plain non-blocking ``AF_NETLINK`` socket so the daemon's asyncio loop can
``add_reader(netlink.fileno(), ...)`` and call ``recv_events()``. pyroute2's synchronous
sockets cannot be used there: every call runs a private loop with ``run_until_complete``,
which raises inside a running loop. The bytes are handled by the small codec in ``genl``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import subprocess
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from tcmu_py.control import genl

FAMILY_NAME: Final = "TCM-USER"
MCAST_GROUP: Final = "config"
# Family version 2 is the one that understands *_DONE replies; tcmu-runner replies only then.
REPLY_MIN_FAMILY_VERSION: Final = 2
_RECV_SIZE: Final = 65536


class TcmuCmd(IntEnum):
    """``enum tcmu_genl_cmd``."""

    UNSPEC = 0
    ADDED_DEVICE = 1
    REMOVED_DEVICE = 2
    RECONFIG_DEVICE = 3
    ADDED_DEVICE_DONE = 4
    REMOVED_DEVICE_DONE = 5
    RECONFIG_DEVICE_DONE = 6
    SET_FEATURES = 7


# Each event is answered by the command three places further on.
DONE_FOR: Final = {
    TcmuCmd.ADDED_DEVICE: TcmuCmd.ADDED_DEVICE_DONE,
    TcmuCmd.REMOVED_DEVICE: TcmuCmd.REMOVED_DEVICE_DONE,
    TcmuCmd.RECONFIG_DEVICE: TcmuCmd.RECONFIG_DEVICE_DONE,
}


class TcmuAttr(IntEnum):
    """``enum tcmu_genl_attr``."""

    UNSPEC = 0
    DEVICE = 1  # string: the uio name, tcm-user/<hba>/<dev>/<cfg>
    MINOR = 2  # u32: /dev/uio<minor>
    PAD = 3  # alignment filler before DEV_SIZE
    DEV_CFG = 4  # string
    DEV_SIZE = 5  # u64
    WRITECACHE = 6  # u8
    CMD_STATUS = 7  # s32: 0 or -errno
    DEVICE_ID = 8  # u32: se_device dev_index, the key of a reply
    SUPP_KERN_CMD_REPLY = 9  # u8


class TcmuNetlinkError(OSError):
    """A TCM-USER request failed; ``errno`` is the kernel's (or the socket's) error."""


class FamilyNotFoundError(TcmuNetlinkError):
    """The kernel has no TCM-USER family: target_core_user is not loaded."""


class NetlinkOverrunError(TcmuNetlinkError):
    """The socket's receive buffer overflowed and events were lost: rescan the uio devices."""


class ModuleLoadError(RuntimeError):
    """``modprobe target_core_user`` could not be run or failed."""


@dataclass(frozen=True)
class NetlinkEvent:
    """One ADDED/REMOVED/RECONFIG_DEVICE event.

    ADDED and REMOVED carry only DEVICE, MINOR and DEVICE_ID (the config string is inside
    ``device``); RECONFIG also carries exactly one of DEV_CFG, DEV_SIZE or WRITECACHE.
    """

    cmd: TcmuCmd
    device: str
    minor: int
    device_id: int
    dev_cfg: str | None = None
    dev_size: int | None = None
    write_cache: bool | None = None


# ---- pure encode/decode: no socket, unit-testable ----------------------------------------


def encode_request(
    family_id: int,
    cmd: int,
    attrs: bytes,
    *,
    seq: int,
    pid: int,
    flags: int = genl.NLM_F_REQUEST | genl.NLM_F_ACK,
) -> bytes:
    """One TCM-USER request; ``attrs`` are already encoded (``genl.nla_*``)."""
    return genl.encode(family_id, cmd, REPLY_MIN_FAMILY_VERSION, attrs, flags=flags, seq=seq, pid=pid)


def encode_reply(family_id: int, event: NetlinkEvent, status: int, *, seq: int, pid: int) -> bytes:
    """The ``*_DONE`` message answering ``event``: CMD_STATUS (0 or -errno) and DEVICE_ID."""
    attrs = genl.nla_s32(TcmuAttr.CMD_STATUS, status) + genl.nla_u32(TcmuAttr.DEVICE_ID, event.device_id)
    return encode_request(family_id, DONE_FOR[event.cmd], attrs, seq=seq, pid=pid)


def encode_set_features(family_id: int, reply_supported: bool, *, seq: int, pid: int) -> bytes:
    attrs = genl.nla_u8(TcmuAttr.SUPP_KERN_CMD_REPLY, int(reply_supported))
    return encode_request(family_id, TcmuCmd.SET_FEATURES, attrs, seq=seq, pid=pid)


def parse_event(msg: genl.Message, family_id: int) -> NetlinkEvent | None:
    """The event a kernel message carries, or None for anything that is not an event."""
    parsed = genl.parse_genl(msg) if msg.type == family_id else None
    if parsed is None or parsed.cmd not in DONE_FOR:
        return None
    a = parsed.attrs

    def uint(attr: TcmuAttr) -> int | None:
        return genl.get_uint(a[attr]) if attr in a else None

    def text(attr: TcmuAttr) -> str | None:
        return genl.get_str(a[attr]) if attr in a else None

    wce = uint(TcmuAttr.WRITECACHE)
    minor = uint(TcmuAttr.MINOR)
    device_id = uint(TcmuAttr.DEVICE_ID)
    return NetlinkEvent(
        cmd=TcmuCmd(parsed.cmd),
        device=text(TcmuAttr.DEVICE) or "",
        minor=-1 if minor is None else minor,
        device_id=-1 if device_id is None else device_id,
        dev_cfg=text(TcmuAttr.DEV_CFG),
        dev_size=uint(TcmuAttr.DEV_SIZE),
        write_cache=None if wce is None else bool(wce),
    )


# ---- the socket ----------------------------------------------------------------------------


class TcmuNetlink:
    """A TCM-USER listener and replier on one non-blocking netlink socket.

    Typical use: ``open()``, ``set_features()``, then on every readable ``fileno()`` call
    ``recv_events()`` and answer each event with ``reply(event, 0 or -errno)``.
    ``timeout`` bounds the wait for the kernel's ack of our own requests (the kernel acks
    synchronously, so in practice the ack is already queued when ``send`` returns).
    """

    def __init__(self, *, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._seq = 0
        self._pending: list[NetlinkEvent] = []
        self.family_id = -1
        self.family_version = 0
        self.group_id = -1

    def open(self) -> None:
        """Resolve the family and join its ``config`` group; FamilyNotFoundError if absent."""
        if self._sock is not None:
            return
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            genl.NETLINK_GENERIC,
        )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            with contextlib.suppress(OSError):  # the kernel then explains a refusal in words
                sock.setsockopt(genl.SOL_NETLINK, genl.NETLINK_EXT_ACK, 1)
            sock.bind((0, 0))
            self._sock = sock
            self._resolve_family()
            sock.setsockopt(genl.SOL_NETLINK, genl.NETLINK_ADD_MEMBERSHIP, self.group_id)
        except BaseException:
            self._sock = None
            sock.close()
            raise

    def fileno(self) -> int:
        return self._socket().fileno()

    @property
    def replies_supported(self) -> bool:
        """Whether this kernel's family understands ``*_DONE`` replies (version ≥ 2)."""
        return self.family_version >= REPLY_MIN_FAMILY_VERSION

    def set_features(self, reply_supported: bool = True) -> None:
        """Tell the kernel (module-wide!) whether to wait for our ``*_DONE`` replies.

        The flag outlives this socket: after a daemon that set it dies, configfs writes of new
        devices hang until someone replies or writes block_netlink/reset_netlink.
        """
        seq = self._next_seq()
        status = self._transact(
            encode_set_features(self.family_id, reply_supported, seq=seq, pid=self._pid()), seq
        )
        if status:
            raise TcmuNetlinkError(status, f"TCM-USER SET_FEATURES refused: {os.strerror(status)}")

    def recv_events(self) -> list[NetlinkEvent]:
        """Every event queued on the socket, without blocking (an empty list if none)."""
        sock = self._socket()
        events, self._pending = self._pending, []
        while True:
            try:
                data = sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return events
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self._pending = events
                    raise NetlinkOverrunError(
                        errno.ENOBUFS, "TCM-USER events were lost (receive buffer overrun)"
                    ) from e
                raise
            events.extend(self._events_in(data))

    def reply(self, event: NetlinkEvent, status: int) -> int:
        """Send the ``*_DONE`` for ``event`` with CMD_STATUS ``status`` (0 or -errno).

        Returns the kernel's verdict on the reply itself: 0 when it woke the waiting configfs
        write, or a positive errno, e.g. ENODEV when nothing waited for that device (replies
        not enabled, or the waiter was already released by reset_netlink).
        """
        if event.cmd not in DONE_FOR or event.device_id < 0:
            raise ValueError(f"{event!r} is not an event that takes a reply")
        seq = self._next_seq()
        return self._transact(encode_reply(self.family_id, event, status, seq=seq, pid=self._pid()), seq)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> TcmuNetlink:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise TcmuNetlinkError(errno.EBADF, "TCM-USER netlink socket is not open")
        return self._sock

    def _pid(self) -> int:
        return int(self._socket().getsockname()[0])

    def _resolve_family(self) -> None:
        seq = self._next_seq()
        answers: list[genl.Message] = []
        status = self._transact(genl.getfamily_request(FAMILY_NAME, seq=seq, pid=self._pid()), seq, answers)
        if status == errno.ENOENT:
            raise FamilyNotFoundError(
                errno.ENOENT,
                f"generic netlink family {FAMILY_NAME} not found: load the kernel module "
                "target_core_user (modprobe target_core_user)",
            )
        family = next((f for f in map(genl.parse_family, answers) if f is not None), None)
        if status or family is None:
            raise TcmuNetlinkError(status or errno.EIO, f"cannot resolve the netlink family {FAMILY_NAME}")
        if MCAST_GROUP not in family.groups:
            raise TcmuNetlinkError(errno.ENOENT, f"{FAMILY_NAME} has no multicast group {MCAST_GROUP!r}")
        self.family_id, self.family_version = family.id, family.version
        self.group_id = family.groups[MCAST_GROUP]

    def _transact(self, data: bytes, seq: int, answers: list[genl.Message] | None = None) -> int:
        """Send ``data`` and wait for the kernel's ack; the positive errno it carries (0: ok).

        Messages with our ``seq`` before the ack go to ``answers``; events that arrive
        meanwhile are kept for the next ``recv_events()``.
        """
        sock = self._socket()
        sock.sendto(data, (0, 0))
        deadline = time.monotonic() + self.timeout
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TcmuNetlinkError(
                    errno.ETIMEDOUT, f"no answer from the kernel's {FAMILY_NAME} in {self.timeout}s"
                )
            if not poller.poll(left * 1000):
                continue
            try:
                chunk = sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            for msg in genl.split(chunk):
                if msg.seq != seq:
                    event = parse_event(msg, self.family_id)
                    if event is not None:
                        self._pending.append(event)
                    continue
                status = genl.ack_errno(msg)
                if status is not None:
                    return status
                if answers is not None:
                    answers.append(msg)

    def _events_in(self, data: bytes) -> list[NetlinkEvent]:
        events = []
        for msg in genl.split(data):
            event = parse_event(msg, self.family_id)
            if event is not None:
                events.append(event)
        return events

    def _next_seq(self) -> int:
        self._seq = self._seq % 0x7FFFFFFF + 1
        return self._seq


def load_module(
    name: str = "target_core_user", *, timeout: float = 30.0, sys_module: str = "/sys/module"
) -> None:
    """Make sure a kernel module is loaded (``modprobe``), or raise one clear ModuleLoadError."""
    if os.path.isdir(os.path.join(sys_module, name)):
        return
    try:
        proc = subprocess.run(
            ["modprobe", name], capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as e:
        raise ModuleLoadError(f"cannot load {name}: modprobe not found (install kmod)") from e
    except subprocess.TimeoutExpired as e:
        raise ModuleLoadError(f"cannot load {name}: modprobe did not finish in {timeout}s") from e
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise ModuleLoadError(
            f"cannot load {name}: modprobe exited {proc.returncode}" + (f": {why[-1]}" if why else "")
        )
