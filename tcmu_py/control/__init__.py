"""The control plane: netlink events, configfs attributes and actions, uio discovery.

Thin adapters kept off the data path. Everything here can be driven from an asyncio loop:
``TcmuNetlink.fileno()`` and ``UioMonitor.fileno()`` go to ``loop.add_reader``, and their
``recv_events()`` / ``poll()`` never block.
"""

from tcmu_py.control.configfs import (
    AluaGroup,
    ConfigFS,
    ConfigFSError,
    ConfigFSTimeoutError,
    bounded_write,
)
from tcmu_py.control.netlink import (
    FamilyNotFoundError,
    ModuleLoadError,
    NetlinkEvent,
    NetlinkOverrunError,
    TcmuAttr,
    TcmuCmd,
    TcmuNetlink,
    TcmuNetlinkError,
    load_module,
)
from tcmu_py.control.uio import (
    UioEvent,
    UioInfo,
    UioMonitor,
    UioName,
    find,
    parse_uio_name,
    read_uio,
    scan,
)

__all__ = [
    "AluaGroup",
    "ConfigFS",
    "ConfigFSError",
    "ConfigFSTimeoutError",
    "FamilyNotFoundError",
    "ModuleLoadError",
    "NetlinkEvent",
    "NetlinkOverrunError",
    "TcmuAttr",
    "TcmuCmd",
    "TcmuNetlink",
    "TcmuNetlinkError",
    "UioEvent",
    "UioInfo",
    "UioMonitor",
    "UioName",
    "bounded_write",
    "find",
    "load_module",
    "parse_uio_name",
    "read_uio",
    "scan",
]
