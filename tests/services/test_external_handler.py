"""HandlerManager1: a handler in another process registers, is listed, checked, and removed.

The external process is ``docs/examples/external_handler.py`` itself (the ``extram``
handler), started with ``--no-netlink``: this tier has no kernel, so only its D-Bus half
runs here (its netlink half is the same Runner the kernel tier drives).  Refusals are
driven by a plain dbus-next client playing a misbehaving handler process.

No ``from __future__ import annotations`` here: dbus-next reads the D-Bus signatures of
the test's ServiceInterface from real (unpostponed) annotations.
"""

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dbus_client import (
    PrivateBus,
    call,
    check_config,
    connected,
    managed_objects,
    ok,
    run,
    serving,
)
from dbus_next import Message, MessageType, NameFlag
from dbus_next.aio import MessageBus
from dbus_next.service import ServiceInterface, method

from tcmu_py.dbus_api import (
    HANDLER_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    OBJECT_PATH,
    external_name,
    external_path,
    handler_path,
)
from tcmu_py.dbus_service import Service
from tcmu_py.registry import load_handlers

pytestmark = pytest.mark.dbus

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "external_handler.py"
DESC = "extram/[;fill=N]: a RAM disk in its own process; every byte starts as N (0-255)"


@contextlib.asynccontextmanager
async def example_process(address: str, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """The documented example, as its own process, on the private bus."""
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--dbus-address", address, "--no-netlink",
            stdout=out, stderr=out)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def until(predicate, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)


async def register(bus: MessageBus, subtype: str, desc: str = "d") -> tuple[bool, str]:
    valid, text = ok(await call(bus, MANAGER_PATH, MANAGER_IFACE, "RegisterHandler", "ss",
                                [subtype, desc]))
    return valid, text


async def own(bus: MessageBus, subtype: str) -> None:
    await bus.request_name(external_name(subtype), NameFlag.DO_NOT_QUEUE)


async def add_match(bus: MessageBus, rule: str) -> None:
    ok(await call(bus, "/org/freedesktop/DBus", "org.freedesktop.DBus", "AddMatch", "s", [rule],
                  destination="org.freedesktop.DBus"))


class FakeExternal(ServiceInterface):
    """A handler process's CheckConfig object that answers late, or with an error."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        super().__init__(HANDLER_IFACE)
        self.delay, self.fail, self.seen = delay, fail, []

    @method()
    async def CheckConfig(self, configstr: "s") -> "bs":  # noqa: F821
        self.seen.append(configstr)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ValueError("the handler process broke")
        return [True, "fine by me"]


# ---- the documented example, end to end ------------------------------------------------------


def test_an_external_handler_is_listed_checked_and_removed_when_its_process_exits(
    dbus_bus: PrivateBus, tmp_path: Path
) -> None:
    handlers = load_handlers(None)

    async def scenario() -> None:
        async with serving(dbus_bus.address, handlers) as svc, connected(dbus_bus.address) as c:
            signals: list[tuple[str, str]] = []
            c.add_message_handler(lambda m: signals.append((m.member, m.body[0])) if (
                m.message_type == MessageType.SIGNAL and m.path == OBJECT_PATH) else None)
            await add_match(c, f"type='signal',path='{OBJECT_PATH}',"
                               "interface='org.freedesktop.DBus.ObjectManager'")

            async with example_process(dbus_bus.address, tmp_path / "extram.log") as proc:
                async def listed() -> bool:
                    return handler_path("extram") in await managed_objects(c)

                await until(listed, "the example registered")
                assert svc.runner.external == {"extram"}
                objects = await managed_objects(c)
                assert set(objects) == {handler_path(s) for s in [*handlers, "extram"]}
                assert objects[handler_path("extram")][HANDLER_IFACE]["ConfigDesc"].value == DESC

                # CheckConfig reaches the example's own parse_config ...
                assert await check_config(c, "extram", "extram/;fill=7") == (True, "success")
                valid, reason = await check_config(c, "extram", "extram/;fill=300")
                assert not valid and "'fill=300': must be from 0 to 255" in reason
                valid, reason = await check_config(c, "extram", "extram//a/path")
                assert not valid and "extram takes no path" in reason
                # ... after the runner's own bounds
                valid, reason = await check_config(c, "extram", "extram/" + "x" * 10_000)
                assert not valid and reason.startswith("config string too long")

                proc.terminate()
                assert await asyncio.wait_for(proc.wait(), 20) == 0

                async def gone() -> bool:
                    return handler_path("extram") not in await managed_objects(c)

                await until(gone, "the object removed after the process exited")
                assert svc.runner.external == set()
                reply = await call(c, handler_path("extram"), HANDLER_IFACE, "CheckConfig", "s",
                                   ["extram/"])
                assert reply.message_type == MessageType.ERROR

            await until(lambda: _true(len(signals) >= 2), "the ObjectManager signals")
            assert signals == [("InterfacesAdded", handler_path("extram")),
                               ("InterfacesRemoved", handler_path("extram"))]

    run(scenario())
    assert "registered with the runner" in (tmp_path / "extram.log").read_text()


async def _true(value: bool) -> bool:
    return value


def test_the_external_handler_registers_again_when_the_runner_restarts(
    dbus_bus: PrivateBus, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with connected(dbus_bus.address) as c, \
                example_process(dbus_bus.address, tmp_path / "extram.log"):
            async def named() -> bool:
                reply = await call(c, "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameHasOwner",
                                   "s", [external_name("extram")], destination="org.freedesktop.DBus")
                return bool(ok(reply)[0])

            await until(named, "the example owns its name")  # it waits for a runner
            for _ in range(2):  # a runner starts; it stops; another starts
                async with serving(dbus_bus.address) as svc:
                    await until(lambda svc=svc: _true("extram" in svc.runner.external),
                                "the example registered with this runner")
                    assert await check_config(c, "extram", "extram/") == (True, "success")

    run(scenario())


def test_a_second_process_for_the_same_subtype_is_refused(dbus_bus: PrivateBus, tmp_path: Path) -> None:
    async def scenario() -> int:
        async with serving(dbus_bus.address) as svc, \
                example_process(dbus_bus.address, tmp_path / "first.log"):
            await until(lambda: _true("extram" in svc.runner.external), "the first registered")
            async with example_process(dbus_bus.address, tmp_path / "second.log") as second:
                return await asyncio.wait_for(second.wait(), 20)

    assert run(scenario()) == 1
    assert "is already owned: another process serves the 'extram' handler" in \
        (tmp_path / "second.log").read_text()


# ---- RegisterHandler refuses -----------------------------------------------------------------


def test_register_handler_refuses_what_it_must(dbus_bus: PrivateBus) -> None:
    async def scenario() -> None:
        async with serving(dbus_bus.address) as svc, connected(dbus_bus.address) as c, \
                connected(dbus_bus.address) as other:
            before = await managed_objects(c)
            await own(other, "theirs")
            await own(c, "long")
            refusals = {
                "file": "is served by tcmu-py-runner itself",
                "HandlerManager1": "is reserved",
                "bad-name": "malformed subtype",
                "9lives": "malformed subtype",
                "x" * 65: "malformed subtype",
                "": "malformed subtype",
                "unowned": "Cannot find handler bus name: org.kernel.TCMUService1.HandlerManager1.unowned",
                "theirs": f"is owned by {other.unique_name}, not by the caller",
            }
            for subtype, reason in refusals.items():
                valid, text = await register(c, subtype)
                assert not valid and reason in text, (subtype, text)
            valid, text = await register(c, "long", "d" * 5000)
            assert not valid and "cfg_desc too long" in text
            assert await managed_objects(c) == before
            assert svc.runner.external == set() and svc.external == {}

    run(scenario())


def test_register_handler_checks_the_callers_uid_itself(dbus_bus: PrivateBus) -> None:
    """Even where the bus policy lets a caller through (Debian's tcmu-runner.conf lets
    everyone), the runner accepts RegisterHandler only from its allowed uids."""

    async def scenario() -> tuple[bool, str]:
        async with serving(dbus_bus.address, register_uids=frozenset({4242})), \
                connected(dbus_bus.address) as c:
            await own(c, "mine")
            return await register(c, "mine")

    valid, text = run(scenario())
    assert not valid and "uid 0 may not register handlers" in text


def test_a_registration_is_idempotent_and_ends_with_the_connection(dbus_bus: PrivateBus) -> None:
    async def scenario() -> None:
        async with serving(dbus_bus.address) as svc, connected(dbus_bus.address) as c:
            async with connected(dbus_bus.address) as ext:
                ext.export(external_path("mine"), FakeExternal())
                await own(ext, "mine")
                assert await register(ext, "mine") == (True, "succeeded")
                assert await register(ext, "mine") == (True, "already registered")
                assert await check_config(c, "mine", "mine/anything") == (True, "fine by me")
            await until(lambda: _true("mine" not in svc.runner.external), "unregistered")
            assert handler_path("mine") not in await managed_objects(c)

    run(scenario())


def test_a_forwarded_check_config_is_bounded_in_time_and_errors(dbus_bus: PrivateBus) -> None:
    async def scenario() -> None:
        async with serving(dbus_bus.address, forward_timeout=0.5) as svc, \
                connected(dbus_bus.address) as c, connected(dbus_bus.address) as ext:
            slow, broken = FakeExternal(delay=30), FakeExternal(fail=True)
            ext.export(external_path("slow"), slow)
            ext.export(external_path("broken"), broken)
            for subtype in ("slow", "broken"):
                await own(ext, subtype)
                assert await register(ext, subtype) == (True, "succeeded")
            valid, reason = await check_config(c, "slow", "slow/x")
            assert not valid and "did not answer CheckConfig within 0.5 s" in reason
            valid, reason = await check_config(c, "broken", "broken/x")
            assert not valid and "failed CheckConfig" in reason
            # bounds are the runner's: a refused string never reaches the handler process
            valid, reason = await check_config(c, "slow", "slow/a,b")
            assert not valid and "splits options" in reason
            assert slow.seen == ["slow/x"] and broken.seen == ["broken/x"]
            assert isinstance(svc, Service)

    run(scenario())


def test_a_clients_forged_name_owner_changed_does_not_unregister_a_handler(dbus_bus: PrivateBus) -> None:
    """A client's own NameOwnerChanged signal does not unregister a handler: only the bus
    daemon's (sender org.freedesktop.DBus) counts."""

    async def scenario() -> None:
        async with serving(dbus_bus.address) as svc, connected(dbus_bus.address) as ext, \
                connected(dbus_bus.address) as evil:
            ext.export(external_path("mine"), FakeExternal())
            await own(ext, "mine")
            assert await register(ext, "mine") == (True, "succeeded")
            spoof = Message.new_signal("/org/freedesktop/DBus", "org.freedesktop.DBus",
                                       "NameOwnerChanged", "sss",
                                       [external_name("mine"), ext.unique_name, ""])
            assert svc.bus is not None
            spoof.destination = svc.bus.unique_name  # unicast: delivered whatever the match rules
            await evil.send(spoof)
            await asyncio.sleep(0.3)
            assert svc.runner.external == {"mine"}

    run(scenario())
