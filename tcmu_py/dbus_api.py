"""The D-Bus contract of ``org.kernel.TCMUService1``: names, paths and the rules of CheckConfig.

Shared by the runner's service (:mod:`tcmu_py.dbus_service`) and by handler processes
that register with it (:mod:`tcmu_py.external`), so that both ends refuse the same
strings with the same words.  Everything here is pure: no bus, no I/O.

The names and paths are tcmu-runner's (``tcmu-handler.xml``, reference/tcmu.md §2.11).
CheckConfig's argument is untrusted: anyone on the system bus may call it, and the
2017 audit of tcmu-runner found crashes and information leaks exactly there.  So the
string is bounded before any handler sees it, and the kernel's own limits on
``dev_config`` are checked here, once, for every handler.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "BUS_NAME",
    "EXTERNAL_NAME_PREFIX",
    "EXTERNAL_PATH_PREFIX",
    "HANDLER_IFACE",
    "KERNEL_CONFIG_MAX_BYTES",
    "MANAGER_IFACE",
    "MANAGER_PATH",
    "MAX_CONFIG_CHARS",
    "MAX_DESC_CHARS",
    "MAX_REASON_CHARS",
    "OBJECT_PATH",
    "clip",
    "config_problem",
    "external_name",
    "external_path",
    "handler_path",
    "subtype_problem",
]

BUS_NAME: Final = "org.kernel.TCMUService1"
#: The ObjectManager; targetcli lists every object it returns as a ``user:`` backstore.
OBJECT_PATH: Final = "/org/kernel/TCMUService1"
#: Interface of every handler object (and of an external handler's own object).
HANDLER_IFACE: Final = "org.kernel.TCMUService1"
MANAGER_PATH: Final = "/org/kernel/TCMUService1/HandlerManager1"
MANAGER_IFACE: Final = "org.kernel.TCMUService1.HandlerManager1"
#: An external handler owns ``<prefix><subtype>`` and exports ``<path prefix><subtype>``.
EXTERNAL_NAME_PREFIX: Final = "org.kernel.TCMUService1.HandlerManager1."
EXTERNAL_PATH_PREFIX: Final = "/org/kernel/TCMUService1/HandlerManager1/"

#: Longer CheckConfig strings are refused before anything else looks at them.
MAX_CONFIG_CHARS: Final = 4096
#: The kernel keeps ``dev_config`` in a 256-byte buffer (``TCMU_CONFIG_LEN``) and
#: ``match_strlcpy`` silently cuts anything longer: the device would get another string.
KERNEL_CONFIG_MAX_BYTES: Final = 255
#: Bounds on what an external handler hands us (its ConfigDesc, its CheckConfig answers).
MAX_DESC_CHARS: Final = 4096
MAX_REASON_CHARS: Final = 1024

#: A subtype must be a D-Bus object path element *and* a bus name element (it appears in
#: both), and it is the ``<subtype>`` of ``user:<subtype>`` in targetcli.
_SUBTYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
#: Object paths of the manager and the handlers share one namespace.
_RESERVED = frozenset({"HandlerManager1"})


def handler_path(subtype: str) -> str:
    """The object targetcli finds for ``user:<subtype>``."""
    return f"{OBJECT_PATH}/{subtype}"


def external_name(subtype: str) -> str:
    """The bus name an external handler of ``subtype`` owns."""
    return EXTERNAL_NAME_PREFIX + subtype


def external_path(subtype: str) -> str:
    """The object an external handler of ``subtype`` exports (its own CheckConfig)."""
    return EXTERNAL_PATH_PREFIX + subtype


def subtype_problem(subtype: str) -> str | None:
    """Why ``subtype`` cannot be published on D-Bus, or None if it can."""
    if subtype in _RESERVED:
        return f"subtype {subtype!r} is reserved (it is the path of the handler manager)"
    if not _SUBTYPE.match(subtype):
        return (
            f"malformed subtype {clip(subtype, 80)!r}: use 1 to 64 letters, digits or '_', "
            "not starting with a digit (it becomes a D-Bus path and bus name element)"
        )
    return None


def config_problem(subtype: str, configstr: str) -> tuple[str, str | None]:
    """Check a CheckConfig argument before any handler sees it.

    targetcli sends the whole ``dev_config``, ``<subtype>/<handler config>`` (it
    prepends the subtype itself).  Returns ``(handler_config, None)`` when the string
    may go on to the handler, or ``("", reason)`` with a reason a person can act on.
    """
    if len(configstr) > MAX_CONFIG_CHARS:
        return "", (
            f"config string too long: {len(configstr)} characters (at most "
            f"{KERNEL_CONFIG_MAX_BYTES} bytes reach the kernel)"
        )
    prefix = subtype + "/"
    if not configstr.startswith(prefix):
        return "", (
            f"{clip(configstr, 80)!r}: expected '{prefix}<config>' (the subtype, a '/', "
            "then the handler's config string)"
        )
    for ch, name in ((",", "','"), ("\n", "a newline")):
        if ch in configstr:
            return "", (
                f"{clip(configstr, 80)!r}: contains {name}; the kernel's control file "
                "splits options there, so the device would get a different config string"
            )
    size = len(configstr.encode("utf-8", "surrogatepass"))
    if size > KERNEL_CONFIG_MAX_BYTES:
        return "", (
            f"config string too long: {size} bytes; the kernel keeps at most "
            f"{KERNEL_CONFIG_MAX_BYTES} bytes of dev_config and would silently cut the rest"
        )
    return configstr[len(prefix) :], None


def clip(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked when cut (for echoing untrusted text)."""
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."
