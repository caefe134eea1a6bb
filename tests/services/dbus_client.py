"""What the D-Bus tests share: a deadline for each scenario, the runner's service on the
private bus, and a plain dbus-next client to call it with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dbus_next import Message, MessageType
from dbus_next.aio import MessageBus

from tcmu_py.daemon import Runner
from tcmu_py.dbus_api import BUS_NAME, HANDLER_IFACE, OBJECT_PATH, handler_path
from tcmu_py.dbus_service import Service, start_service
from tcmu_py.handler import Handler
from tcmu_py.registry import load_handlers


def unavailable(what: str, why: str) -> None:
    """A prerequisite is missing: a failure under ``CI=true``, otherwise a skip saying why."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"the service tier cannot run {what}: {why}", pytrace=False)
    pytest.skip(f"{what}: {why} (with CI=true this fails)")


@dataclass(frozen=True)
class PrivateBus:
    """A running private bus: its address, and the environment that makes it *the* system
    bus for a child process (GLib, hence targetcli, and dbus-next read it)."""

    address: str
    socket: Path
    pid: int
    #: a file-system root for activation files: the bus reads ROOT/usr/local/share/dbus-1/
    #: system-services, then ROOT/usr/share/dbus-1/system-services (the standard order)
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.address}


T = TypeVar("T")
SCENARIO_TIMEOUT_S = 60.0


def run(coro: Coroutine[Any, Any, T], timeout: float = SCENARIO_TIMEOUT_S) -> T:
    """Run one test scenario on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving(
    address: str, handlers: Mapping[str, type[Handler]] | None = None, **kw: Any
) -> AsyncIterator[Service]:
    """The runner's service on the bus at ``address`` (a Runner without netlink behind it)."""
    runner = Runner(asyncio.get_running_loop(),
                    load_handlers(None) if handlers is None else handlers, use_netlink=False)
    service = await start_service(runner, address=address, **kw)
    try:
        yield service
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def connected(address: str) -> AsyncIterator[MessageBus]:
    """A client connection to the bus at ``address``."""
    bus = await MessageBus(bus_address=address).connect()
    try:
        yield bus
    finally:
        bus.disconnect()


async def call(bus: MessageBus, path: str, interface: str, member: str, signature: str = "",
               body: list[Any] | None = None, destination: str = BUS_NAME) -> Message:
    """One method call; the reply, which may be an error message."""
    reply = await bus.call(Message(destination=destination, path=path, interface=interface,
                                   member=member, signature=signature, body=body or []))
    assert reply is not None
    return reply


def ok(reply: Message) -> list[Any]:
    """The body of a successful reply (fails the test with the error otherwise)."""
    assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return list(reply.body)


async def check_config(bus: MessageBus, subtype: str, configstr: str) -> tuple[bool, str]:
    """targetcli's call: CheckConfig('<subtype>/<cfg>') on the handler's object."""
    valid, reason = ok(await call(bus, handler_path(subtype), HANDLER_IFACE, "CheckConfig", "s",
                                  [configstr]))
    return valid, reason


async def managed_objects(bus: MessageBus) -> dict[str, Any]:
    (objects,) = ok(await call(bus, OBJECT_PATH, "org.freedesktop.DBus.ObjectManager",
                               "GetManagedObjects"))
    return dict(objects)


async def eventually(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll an async or plain predicate until it is true; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.05)


SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's interpreter: python3-gi and targetcli-fb live there
PROBE = Path(__file__).with_name("gio_probe.py")


async def gio_probe(bus: PrivateBus, ops: list[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    """Run ``gio_probe.py`` with the private bus as its system bus; its JSON results."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        unavailable("the Gio client", f"{SYSTEM_PYTHON} is missing")
    # the source on the command line: an unprivileged user may not be able to read the checkout
    proc = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-c", PROBE.read_text(), json.dumps(ops), env=bus.env, cwd="/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, **kw)  # type: ignore[arg-type]
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    results: list[dict[str, Any]] = json.loads(out)
    return results
