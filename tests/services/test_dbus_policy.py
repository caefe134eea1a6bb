"""Our D-Bus policy on a bus that enforces it: a user created for the test is refused.

The ``dbus_bus`` fixture's daemon loads ``systemd/tcmu-py-runner.conf`` on top of the system
bus's default-deny rules.  A throwaway system user (``useradd``, removed afterwards) then
runs a Gio client, as targetcli would: it may list the handlers, read ConfigDesc,
introspect and call CheckConfig, and may not own ``org.kernel.TCMUService1`` or a handler
name, call RegisterHandler, or call anything else.  Root, with the same client, passes.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from dbus_client import PrivateBus, gio_probe, run, serving, unavailable

from tcmu_py.dbus_api import (
    BUS_NAME,
    HANDLER_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    OBJECT_PATH,
    external_name,
    handler_path,
)
from tcmu_py.registry import load_handlers

pytestmark = pytest.mark.dbus

ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


@contextlib.contextmanager
def throwaway_user() -> Iterator[pwd.struct_passwd]:
    """A new unprivileged system user with its own group, deleted on exit."""
    if os.geteuid() != 0:
        unavailable("the policy tests", "they need root, to create a test user")
    for tool in ("useradd", "userdel"):
        if shutil.which(tool) is None:
            unavailable("the policy tests", f"{tool} is not installed (Debian package passwd)")
    name = f"tcmupy-{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                   check=True, timeout=60, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], timeout=60, capture_output=True, check=False)
        subprocess.run(["groupdel", name], timeout=60, capture_output=True, check=False)
    assert not _exists(name), f"test user {name} was not removed"


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _call(path: str, iface: str, member: str, sig: str = "", args: list[Any] | None = None) -> dict[str, Any]:
    return {"op": "call", "dest": BUS_NAME, "path": path, "iface": iface, "member": member,
            "sig": sig, "args": args or []}


OPS: dict[str, dict[str, Any]] = {
    "own the runner's name": {"op": "own", "name": BUS_NAME},
    "own a handler name": {"op": "own", "name": external_name("evil")},
    "RegisterHandler": _call(MANAGER_PATH, MANAGER_IFACE, "RegisterHandler", "(ss)", ["evil", "x"]),
    "ChangeMedium": _call(handler_path("file"), HANDLER_IFACE, "ChangeMedium", "(sts)",
                          ["d0", 1 << 20, "file//var/tmp/x"]),
    "CheckConfig good": _call(handler_path("file"), HANDLER_IFACE, "CheckConfig", "(s)",
                              ["file//var/tmp/x.img"]),
    "CheckConfig bad": _call(handler_path("file"), HANDLER_IFACE, "CheckConfig", "(s)", ["file/x"]),
    "GetManagedObjects": _call(OBJECT_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
    "ConfigDesc": _call(handler_path("file"), "org.freedesktop.DBus.Properties", "Get", "(ss)",
                        [HANDLER_IFACE, "ConfigDesc"]),
    "Introspect": _call(OBJECT_PATH, "org.freedesktop.DBus.Introspectable", "Introspect"),
    "targetcli lists": {"op": "targetcli_backstores"},
}
REFUSED = ["own the runner's name", "own a handler name", "RegisterHandler", "ChangeMedium"]
ALLOWED = ["CheckConfig good", "CheckConfig bad", "GetManagedObjects", "ConfigDesc", "Introspect",
           "targetcli lists"]


def probe_as(bus: PrivateBus, user: pwd.struct_passwd | None) -> dict[str, dict[str, Any]]:
    """Every operation of OPS through the Gio client, as ``user`` (None: as root)."""
    handlers = load_handlers(None)
    as_user: dict[str, Any] = {} if user is None else {
        "user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    async def scenario() -> list[dict[str, Any]]:
        async with serving(bus.address, handlers):
            return await gio_probe(bus, list(OPS.values()), **as_user)

    return dict(zip(OPS, run(scenario()), strict=True))


def test_an_unprivileged_user_may_check_config_but_not_own_or_register(dbus_bus: PrivateBus) -> None:
    with throwaway_user() as user:
        # while nobody owns it, the name is still not the user's to take
        before = run(gio_probe(dbus_bus, [{"op": "own", "name": BUS_NAME}],
                               user=user.pw_uid, group=user.pw_gid, extra_groups=[]))
        got = probe_as(dbus_bus, user)
    assert ACCESS_DENIED in before[0].get("error", ""), before
    for what in REFUSED:
        assert ACCESS_DENIED in got[what].get("error", ""), (what, got[what])
    assert got["CheckConfig good"] == {"ok": [True, "success"]}
    assert got["CheckConfig bad"]["ok"][0] is False
    assert "must be absolute" in got["CheckConfig bad"]["ok"][1]
    assert handler_path("file") in got["GetManagedObjects"]["ok"][0]
    assert "ok" in got["ConfigDesc"] and "ok" in got["Introspect"]
    assert sorted(n for n, _ in got["targetcli lists"]["ok"]) == sorted(load_handlers(None))


def test_root_passes_the_policy_where_the_user_is_refused(dbus_bus: PrivateBus) -> None:
    got = probe_as(dbus_bus, None)
    for what in ALLOWED:
        assert "ok" in got[what], (what, got[what])
    assert got["own the runner's name"] == {"ok": 3}  # allowed, but taken: EXISTS
    assert got["own a handler name"] == {"ok": 1}  # PRIMARY_OWNER
    assert "ok" in got["RegisterHandler"]  # reached the runner, which answered (b, s)
    # ChangeMedium reaches the runner too, which answers with its own clean error
    assert "org.freedesktop.DBus.Error.NotSupported" in got["ChangeMedium"]["error"]
