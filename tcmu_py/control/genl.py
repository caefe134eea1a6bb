"""A minimal generic netlink codec: message headers, flat attributes, the nlctrl family reply.

Pure byte functions (no socket), so they are tested against kernel-layout bytes on any host.
Written out rather than taken from pyroute2: ``import pyroute2`` loads about 160 modules
(0.25 s on a host, 6-25 s in the TCG test guest) for the few dozen lines TCM-USER needs.
Layouts: ``struct nlmsghdr`` (16 bytes), ``struct genlmsghdr`` (4 bytes), ``struct nlattr``
(4 bytes), every part aligned to 4 bytes (include/uapi/linux/netlink.h, genetlink.h).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

NLMSG_HDR: Final = struct.Struct("<IHHII")  # len, type, flags, seq, pid
GENL_HDR: Final = struct.Struct("<BBH")  # cmd, version, reserved
NLA_HDR: Final = struct.Struct("<HH")  # len, type
NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4

SOL_NETLINK: Final = 270
NETLINK_ADD_MEMBERSHIP: Final = 1
NETLINK_EXT_ACK: Final = 11
NETLINK_GENERIC: Final = 16

# The nlctrl family (always id 0x10), used to look other families up by name.
GENL_ID_CTRL: Final = 0x10
CTRL_CMD_GETFAMILY: Final = 3
CTRL_ATTR_FAMILY_ID: Final = 1  # u16
CTRL_ATTR_FAMILY_NAME: Final = 2  # string
CTRL_ATTR_VERSION: Final = 3  # u32
CTRL_ATTR_MCAST_GROUPS: Final = 7  # nested array of nested {NAME, ID}
CTRL_ATTR_MCAST_GRP_NAME: Final = 1  # string
CTRL_ATTR_MCAST_GRP_ID: Final = 2  # u32


def _align4(n: int) -> int:
    return (n + 3) & ~3


# ---- attributes ------------------------------------------------------------------------------


def nla(attr_type: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes as the kernel's nla_put() does."""
    raw = NLA_HDR.pack(NLA_HDR.size + len(payload), attr_type) + payload
    return raw + b"\0" * (_align4(len(raw)) - len(raw))


def nla_u8(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("<B", value))


def nla_u16(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("<H", value))


def nla_u32(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("<I", value))


def nla_u64(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("<Q", value))


def nla_s32(attr_type: int, value: int) -> bytes:
    return nla(attr_type, struct.pack("<i", value))


def nla_str(attr_type: int, value: str) -> bytes:
    """NLA_STRING / NLA_NUL_STRING: UTF-8 with the terminating NUL."""
    return nla(attr_type, value.encode("utf-8", "surrogateescape") + b"\0")


def parse_attrs(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of every attribute in ``data``, in order; stops at a truncated one."""
    attrs = []
    off = 0
    while off + NLA_HDR.size <= len(data):
        length, attr_type = NLA_HDR.unpack_from(data, off)
        if length < NLA_HDR.size or off + length > len(data):
            break
        attrs.append((attr_type & NLA_TYPE_MASK, bytes(data[off + NLA_HDR.size : off + length])))
        off += _align4(length)
    return attrs


def attr_map(data: bytes) -> dict[int, bytes]:
    """Attributes by type; the first of a repeated type wins, like nla_parse()."""
    found: dict[int, bytes] = {}
    for attr_type, payload in parse_attrs(data):
        found.setdefault(attr_type, payload)
    return found


def get_uint(payload: bytes) -> int:
    """An unsigned attribute of 1, 2, 4 or 8 bytes (NLA_U8 ... NLA_U64)."""
    return int.from_bytes(payload, "little", signed=False)


def get_s32(payload: bytes) -> int:
    return int(struct.unpack("<i", payload[:4])[0])


def get_str(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# ---- messages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One netlink message: header fields and everything after the 16-byte header."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes


@dataclass(frozen=True)
class GenlMessage:
    """A generic netlink message split into command, version and attributes."""

    cmd: int
    version: int
    attrs: dict[int, bytes] = field(default_factory=dict)


def encode(msg_type: int, cmd: int, version: int, attrs: bytes, *, flags: int, seq: int, pid: int) -> bytes:
    """A complete generic netlink message: nlmsghdr, genlmsghdr, then the attribute bytes."""
    body = GENL_HDR.pack(cmd, version, 0) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, flags, seq, pid) + body


def split(data: bytes) -> list[Message]:
    """The messages of one datagram; a truncated tail is dropped."""
    msgs = []
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, msg_type, flags, seq, pid = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            break
        msgs.append(Message(msg_type, flags, seq, pid, bytes(data[off + NLMSG_HDR.size : off + length])))
        off += _align4(length)
    return msgs


def parse_genl(msg: Message) -> GenlMessage | None:
    """The generic netlink view of ``msg``, or None if it is too short to be one."""
    if len(msg.payload) < GENL_HDR.size:
        return None
    cmd, version, _ = GENL_HDR.unpack_from(msg.payload)
    return GenlMessage(cmd, version, attr_map(msg.payload[GENL_HDR.size :]))


def ack_errno(msg: Message) -> int | None:
    """For an NLMSG_ERROR message the positive errno (0 is a plain ack), else None."""
    if msg.type != NLMSG_ERROR or len(msg.payload) < 4:
        return None
    return abs(get_s32(msg.payload))


@dataclass(frozen=True)
class Family:
    """What nlctrl says about a generic netlink family."""

    id: int
    version: int
    groups: dict[str, int]


def getfamily_request(name: str, *, seq: int, pid: int) -> bytes:
    return encode(
        GENL_ID_CTRL,
        CTRL_CMD_GETFAMILY,
        1,
        nla_str(CTRL_ATTR_FAMILY_NAME, name),
        flags=NLM_F_REQUEST | NLM_F_ACK,
        seq=seq,
        pid=pid,
    )


def parse_family(msg: Message) -> Family | None:
    """The family described by an nlctrl NEWFAMILY answer, or None if ``msg`` is not one."""
    genl = parse_genl(msg) if msg.type == GENL_ID_CTRL else None
    if genl is None or CTRL_ATTR_FAMILY_ID not in genl.attrs:
        return None
    groups = {}
    for _, group in parse_attrs(genl.attrs.get(CTRL_ATTR_MCAST_GROUPS, b"")):
        g = attr_map(group)
        if CTRL_ATTR_MCAST_GRP_NAME in g and CTRL_ATTR_MCAST_GRP_ID in g:
            groups[get_str(g[CTRL_ATTR_MCAST_GRP_NAME])] = get_uint(g[CTRL_ATTR_MCAST_GRP_ID])
    version = genl.attrs.get(CTRL_ATTR_VERSION)
    return Family(
        id=get_uint(genl.attrs[CTRL_ATTR_FAMILY_ID]),
        version=get_uint(version) if version is not None else 0,
        groups=groups,
    )
