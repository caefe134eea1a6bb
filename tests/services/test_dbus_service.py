"""org.kernel.TCMUService1 on a private bus: what targetcli sees, and what any user may send.

Each test starts the runner's service on the ``dbus_bus`` fixture's daemon and talks to it
as a client would: dbus-next for most calls, and targetcli's own code (GLib's Gio, in a
separate process on Debian's interpreter) for the targetcli view.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from dbus_client import (
    PrivateBus,
    call,
    check_config,
    connected,
    gio_probe,
    managed_objects,
    ok,
    run,
    serving,
    unavailable,
)
from dbus_next import MessageType
from dbus_next.constants import ErrorType

from tcmu_py.dbus_api import (
    BUS_NAME,
    HANDLER_IFACE,
    KERNEL_CONFIG_MAX_BYTES,
    MANAGER_PATH,
    MAX_CONFIG_CHARS,
    OBJECT_PATH,
    handler_path,
)
from tcmu_py.dbus_service import ServiceError
from tcmu_py.registry import load_handlers
from tcmu_py_handlers.file import FileHandler
from tcmu_py_handlers.ram import RamHandler

pytestmark = pytest.mark.dbus

# ---- what targetcli lists -------------------------------------------------------------------


def test_get_managed_objects_lists_exactly_one_object_per_handler(dbus_bus: PrivateBus) -> None:
    handlers = load_handlers(None)

    async def scenario() -> None:
        async with serving(dbus_bus.address, handlers), connected(dbus_bus.address) as c:
            objects = await managed_objects(c)
        assert set(objects) == {handler_path(s) for s in handlers}  # no HandlerManager1
        for subtype, cls in handlers.items():
            props = objects[handler_path(subtype)]
            assert set(props) == {HANDLER_IFACE}
            assert props[HANDLER_IFACE]["ConfigDesc"].value == cls.cfg_desc

    run(scenario())


def test_targetcli_lists_exactly_our_handlers_and_no_handler_manager(
    dbus_bus: PrivateBus, caplog: pytest.LogCaptureFixture
) -> None:
    handlers = load_handlers(None)

    async def scenario() -> list[dict]:
        async with serving(dbus_bus.address, handlers):
            return await gio_probe(dbus_bus, [
                {"op": "targetcli_backstores"},
                {"op": "targetcli_check", "handler": "file", "cfgstring": "/var/tmp/disk.img"},
                {"op": "targetcli_check", "handler": "file", "cfgstring": "disk.img"},
            ])

    try:
        import gi  # noqa: F401
        import targetcli  # noqa: F401
    except ImportError as e:
        unavailable("the targetcli view", f"{e} (Debian packages targetcli-fb, python3-gi)")
    with caplog.at_level(logging.WARNING):
        listed, good, bad = run(scenario())
    assert sorted(listed["ok"]) == sorted([s, cls.cfg_desc] for s, cls in handlers.items())
    assert good == {"ok": [True, "success"]}
    assert bad["ok"][0] is False and "must be absolute" in bad["ok"][1]
    # Gio's proxy of the ObjectManager path asks it for properties: answered, not logged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_bad_calls_to_the_standard_interfaces_are_answered_and_not_logged(
    dbus_bus: PrivateBus, caplog: pytest.LogCaptureFixture
) -> None:
    """dbus-next would answer these and then log a traceback at ERROR: anyone on the bus
    could flood the runner's log that way."""

    async def scenario() -> list[str | None]:
        props = "org.freedesktop.DBus.Properties"
        async with serving(dbus_bus.address), connected(dbus_bus.address) as c:
            replies = [
                await call(c, OBJECT_PATH, props, "GetAll", "s", ["org.freedesktop.DBus.ObjectManager"]),
                await call(c, OBJECT_PATH, props, "Get", "ss", [HANDLER_IFACE, "ConfigDesc"]),
                await call(c, handler_path("file"), props, "Get", "ss", [HANDLER_IFACE, "Nope"]),
                await call(c, handler_path("file"), props, "GetAll", "s", ["no.such.Iface"]),
                await call(c, "/nowhere", props, "GetAll", "s", [HANDLER_IFACE]),
            ]
        return [r.error_name for r in replies]

    with caplog.at_level(logging.WARNING):
        errors = run(scenario())
    assert errors[0] is None  # the ObjectManager's own (empty) properties
    assert all(e is not None and e.startswith("org.freedesktop.DBus.Error.") for e in errors[1:])
    assert not caplog.records, caplog.text


def test_object_manager_answers_only_at_its_own_path(dbus_bus: PrivateBus) -> None:
    async def scenario() -> None:
        async with serving(dbus_bus.address), connected(dbus_bus.address) as c:
            for path in ("/", MANAGER_PATH, handler_path("file")):
                reply = await call(c, path, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
                assert reply.message_type == MessageType.ERROR, path
                assert reply.error_name == ErrorType.UNKNOWN_METHOD.value
                assert OBJECT_PATH in reply.body[0]

    run(scenario())


def test_config_desc_is_the_handlers_cfg_desc(dbus_bus: PrivateBus) -> None:
    async def scenario() -> None:
        async with serving(dbus_bus.address), connected(dbus_bus.address) as c:
            props = "org.freedesktop.DBus.Properties"
            (desc,) = ok(await call(c, handler_path("file"), props, "Get", "ss",
                                    [HANDLER_IFACE, "ConfigDesc"]))
            assert desc.value == FileHandler.cfg_desc
            (everything,) = ok(await call(c, handler_path("ram"), props, "GetAll", "s", [HANDLER_IFACE]))
            assert {k: v.value for k, v in everything.items()} == {"ConfigDesc": RamHandler.cfg_desc}
            denied = await call(c, handler_path("ram"), props, "Set", "ssv",
                                [HANDLER_IFACE, "ConfigDesc", everything["ConfigDesc"]])
            assert denied.message_type == MessageType.ERROR  # read-only (and root-only by policy)

    run(scenario())


# ---- CheckConfig: really parsed, and bounded --------------------------------------------------


@pytest.mark.parametrize(
    ("subtype", "configstr", "valid", "reason"),
    [
        ("file", "file//var/tmp/disk.img", True, "success"),
        ("file", "file//var/tmp/disk.img;threads=4;direct=1", True, "success"),
        ("file", "file/;tcmur_cmd_time_out=20;/var/tmp/disk.img", True, "success"),
        ("file", "file/disk.img", False, "must be absolute"),
        ("file", "file//var/tmp/disk.img;threads=0", False, "'threads=0'"),
        ("file", "file//var/tmp/disk.img;bogus=1", False, "unknown option 'bogus'"),
        ("file", "file/;tcmur_cmd_time_out=soon;/x", False, "tcmur_cmd_time_out"),
        ("file", "file/", False, "no image path"),
        ("ram", "ram/", True, "success"),
        ("ram", "ram/;hugepages=1", True, "success"),
        ("ram", "ram/;hugepages=2", False, "hugepages"),
        ("ram", "ram//some/path", False, "ram takes no path"),
        # the string targetcli sends starts with the subtype: anything else is refused
        ("file", "/var/tmp/disk.img", False, "expected 'file/<config>'"),
        ("ram", "file//var/tmp/disk.img", False, "expected 'ram/<config>'"),
        # the kernel splits control options at ',' and newline: the device would differ
        ("file", "file//var/tmp/a,b.img", False, "splits options"),
        ("file", "file//var/tmp/a\nb.img", False, "splits options"),
    ],
)
def test_check_config_answers_with_the_handlers_own_parser(
    dbus_bus: PrivateBus, subtype: str, configstr: str, valid: bool, reason: str
) -> None:
    async def scenario() -> tuple[bool, str]:
        async with serving(dbus_bus.address, {"file": FileHandler, "ram": RamHandler}), \
                connected(dbus_bus.address) as c:
            return await check_config(c, subtype, configstr)

    got_valid, got_reason = run(scenario())
    assert (got_valid, reason in got_reason) == (valid, True), got_reason


def test_check_config_refuses_huge_strings_without_parsing_them(dbus_bus: PrivateBus) -> None:
    cases = {
        "file/" + "x" * (1 << 20): f"{(1 << 20) + 5} characters",  # 1 MiB
        "file//" + "a" * MAX_CONFIG_CHARS: "characters",
        "file//" + "a" * (KERNEL_CONFIG_MAX_BYTES - 5): "256 bytes",  # one too many
        "file//" + "é" * 130: "266 bytes",  # only 136 characters, but the kernel counts bytes
    }

    async def scenario() -> list[tuple[bool, str]]:
        async with serving(dbus_bus.address), connected(dbus_bus.address) as c:
            return [await check_config(c, "file", s) for s in cases]

    for (valid, reason), expected in zip(run(scenario()), cases.values(), strict=True):
        assert valid is False
        assert reason.startswith("config string too long") and expected in reason, reason
        assert len(reason) < 200  # the input is never echoed back in full
    longest_ok = "file//" + "a" * (KERNEL_CONFIG_MAX_BYTES - 6)
    assert run(_check_one(dbus_bus, "file", longest_ok)) == (True, "success")


async def _check_one(bus: PrivateBus, subtype: str, configstr: str) -> tuple[bool, str]:
    async with serving(bus.address), connected(bus.address) as c:
        return await check_config(c, subtype, configstr)


def test_check_config_survives_hostile_strings_and_keeps_serving(dbus_bus: PrivateBus) -> None:
    hostile = [
        "", "/", "//", "file", "file/\x01\x02\x7f\x1b[31m", "file//\u202e",
        "file//%s%n%x%p", "file//../../../../etc/shadow;readonly=1",
        "file/;;;;;", "file/;tcmur_cmd_time_out=" + "9" * 200, "rbd/" + "/" * 250,
        "file//" + "\U0001f4a9" * 60, "file//x;threads=" + "1" * 100,
    ]

    async def scenario() -> list[tuple[bool, str]]:
        handlers = load_handlers(None)
        async with serving(dbus_bus.address, handlers), connected(dbus_bus.address) as c:
            answers = [await check_config(c, s, text) for text in hostile for s in handlers]
            assert set(await managed_objects(c)) == {handler_path(s) for s in handlers}
            return answers

    for valid, reason in run(scenario()):
        assert isinstance(valid, bool) and isinstance(reason, str)
        assert "Traceback" not in reason and len(reason) <= 1024


def test_check_config_creates_no_file(dbus_bus: PrivateBus, tmp_path: Path) -> None:
    image = tmp_path / "never" / "created.img"

    async def scenario() -> tuple[bool, str]:
        async with serving(dbus_bus.address), connected(dbus_bus.address) as c:
            return await check_config(c, "file", f"file/{image}")

    assert run(scenario()) == (True, "success")
    assert not image.parent.exists()


# ---- what we do not serve -----------------------------------------------------------------------


def test_change_medium_gets_a_clean_not_supported_error(dbus_bus: PrivateBus) -> None:
    async def scenario() -> None:
        async with serving(dbus_bus.address), connected(dbus_bus.address) as c:
            reply = await call(c, handler_path("file"), HANDLER_IFACE, "ChangeMedium", "sts",
                               ["disk0", 1 << 30, "file//var/tmp/other.img"])
            assert reply.message_type == MessageType.ERROR
            assert reply.error_name == ErrorType.NOT_SUPPORTED.value
            assert "delete the backstore and create it again" in reply.body[0]
            unknown = await call(c, handler_path("file"), HANDLER_IFACE, "Frobnicate", "s", ["x"])
            assert unknown.error_name == ErrorType.UNKNOWN_METHOD.value
            wrong = await call(c, handler_path("file"), HANDLER_IFACE, "CheckConfig", "i", [3])
            assert wrong.error_name == ErrorType.UNKNOWN_METHOD.value
            for r in (reply, unknown, wrong):
                assert "Traceback" not in r.body[0]

    run(scenario())


# ---- start-up errors --------------------------------------------------------------------------


def test_a_second_runner_on_the_bus_gets_a_clear_error(dbus_bus: PrivateBus) -> None:
    async def scenario() -> None:
        async with serving(dbus_bus.address):
            with pytest.raises(ServiceError, match=rf"{BUS_NAME} is already owned .* by pid {os.getpid()}"):
                async with serving(dbus_bus.address):
                    pass

    run(scenario())


def test_a_bus_that_is_not_there_gets_a_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(ServiceError, match=r"cannot connect to the D-Bus bus at .*is dbus running"):
            async with serving(f"unix:path={tmp_path}/no-bus"):
                pass

    run(scenario())


def test_a_subtype_that_is_no_object_path_element_is_left_out_with_a_warning(
    dbus_bus: PrivateBus, caplog: pytest.LogCaptureFixture
) -> None:
    class Dashed(RamHandler):
        subtype = "ram-disk"

    async def scenario() -> dict[str, object]:
        async with serving(dbus_bus.address, {"ram": RamHandler, "ram-disk": Dashed}), \
                connected(dbus_bus.address) as c:
            return await managed_objects(c)

    with caplog.at_level(logging.WARNING, "tcmu_py.dbus"):
        assert set(run(scenario())) == {handler_path("ram")}
    assert "'ram-disk' is not published on D-Bus" in caplog.text
