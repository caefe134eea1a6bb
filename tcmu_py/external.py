"""A handler in a process of its own: register with the runner over D-Bus, serve over netlink.

This is libtcmu's external-handler flow (reference/tcmu.md §2.11, libtcmu-register.c)
with tcmu-py's engine.  The process

1. owns ``org.kernel.TCMUService1.HandlerManager1.<subtype>`` and exports its own
   CheckConfig (the handler's ``parse_config``) at
   ``/org/kernel/TCMUService1/HandlerManager1/<subtype>``;
2. calls ``HandlerManager1.RegisterHandler`` every time ``org.kernel.TCMUService1``
   appears, so a restarted runner learns about it again;
3. listens to TCM-USER netlink and serves the devices of its subtype with the same
   :class:`~tcmu_py.daemon.Runner` and engine as the host's runner, in non-exclusive mode:
   it answers only its own subtype's events and leaves the module-wide netlink state
   (block/reset, SET_FEATURES) to the runner.

The kernel takes the first reply to each event (tcmu-runner #516, #678), so the runner must
know the subtype is external *before* a device of it is created: wait for
:attr:`ExternalHandler.registered` before creating backstores.

Usage (``docs/examples/external_handler.py``)::

    if __name__ == "__main__":
        sys.exit(tcmu_py.external.main(MyHandler))
"""

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any

from dbus_next import BusType, DBusError, Message, MessageType, NameFlag
from dbus_next.aio import MessageBus
from dbus_next.constants import ErrorType, RequestNameReply

from tcmu_py.daemon import Runner
from tcmu_py.dbus_api import (
    BUS_NAME,
    MANAGER_IFACE,
    MANAGER_PATH,
    clip,
    external_name,
    external_path,
    subtype_problem,
)
from tcmu_py.dbus_service import HandlerObject, ServiceBus, local_check
from tcmu_py.handler import Handler, problems

__all__ = ["ExternalError", "ExternalHandler", "main"]

log = logging.getLogger("tcmu_py.external")

_TIMEOUT_S = 10.0


class ExternalError(Exception):
    """The handler process cannot start; the text is one line naming cause and fix."""


class ExternalHandler:
    """One handler class served from this process (see the module docstring).

    ``netlink=False`` does only the D-Bus half (tests, or a process that gets its devices
    some other way); ``runner_kw`` go to :class:`~tcmu_py.daemon.Runner` (configfs root...).
    """

    def __init__(
        self,
        handler_cls: type[Handler],
        *,
        bus_address: str | None = None,
        netlink: bool = True,
        runner_kw: dict[str, Any] | None = None,
    ) -> None:
        wrong = problems(handler_cls)
        if wrong:
            raise ExternalError(f"{handler_cls!r} is not a usable handler: {'; '.join(wrong)}")
        why = subtype_problem(handler_cls.subtype)
        if why is not None:
            raise ExternalError(why)
        self.handler_cls = handler_cls
        self.subtype = handler_cls.subtype
        self.bus_address = bus_address
        self.netlink = netlink
        self.runner_kw = runner_kw or {}
        self.bus: MessageBus | None = None
        self.runner: Runner | None = None
        #: set while the runner lists us (RegisterHandler succeeded and the runner is up)
        self.registered = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Own the name, export CheckConfig, start netlink, register if the runner is up."""
        where = f"the D-Bus bus at {self.bus_address}" if self.bus_address else "the system bus"
        try:  # dbus-next opens the socket in the constructor already
            bus = (ServiceBus(bus_address=self.bus_address) if self.bus_address
                   else ServiceBus(bus_type=BusType.SYSTEM))
            await asyncio.wait_for(bus.connect(), _TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a boundary: every failure is answered, never raised
            raise ExternalError(f"cannot connect to {where}: {type(e).__name__}: {e}") from None
        self.bus = bus
        try:
            bus.export(external_path(self.subtype),
                       HandlerObject(self.handler_cls.cfg_desc, local_check(self.handler_cls)))
            bus.add_message_handler(self._on_message)
            await self._call_bus("AddMatch", "s", [
                "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                f"member='NameOwnerChanged',arg0='{BUS_NAME}'"])
            await self._own_name(bus, where)
            if self.netlink:
                loop = asyncio.get_running_loop()
                self.runner = Runner(loop, {self.subtype: self.handler_cls}, exclusive=False,
                                     **self.runner_kw)
                await self.runner.start()
            try:
                await self._call_bus("GetNameOwner", "s", [BUS_NAME])
            except DBusError:
                log.info("waiting for the runner (%s) to appear on %s", BUS_NAME, where)
            else:
                await self._register()
        except BaseException:
            await self.stop()
            raise

    async def _own_name(self, bus: MessageBus, where: str) -> None:
        name = external_name(self.subtype)
        try:
            reply = await asyncio.wait_for(bus.request_name(name, NameFlag.DO_NOT_QUEUE), _TIMEOUT_S)
        except DBusError as e:
            if e.type == ErrorType.ACCESS_DENIED.value:
                raise ExternalError(f"{where} does not let this process own {name}: external "
                                    "handlers run as root (see the D-Bus policy)") from None
            raise ExternalError(f"cannot own {name}: {e.text}") from None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise ExternalError(f"{name} is already owned: another process serves the "
                                f"{self.subtype!r} handler")

    async def _register(self) -> bool:
        """RegisterHandler on the runner; True when it lists us."""
        assert self.bus is not None
        call = Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE,
                       member="RegisterHandler", signature="ss",
                       body=[self.subtype, self.handler_cls.cfg_desc])
        try:
            reply = await asyncio.wait_for(self.bus.call(call), _TIMEOUT_S)
        except TimeoutError:
            log.error("the runner did not answer RegisterHandler within %g s", _TIMEOUT_S)
            return False
        if reply is None or reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply is not None and reply.signature == "s" else ""
            log.error("RegisterHandler(%s) failed: %s %s", self.subtype,
                      reply.error_name if reply is not None else "no reply", clip(text))
            return False
        ok, text = reply.body
        if not ok:
            log.error("the runner refused handler %r: %s", self.subtype, clip(text))
            return False
        log.info("handler %r registered with the runner (%s)", self.subtype, text)
        self.registered.set()
        return True

    def _on_message(self, msg: Message) -> bool:
        if (msg.message_type == MessageType.SIGNAL and msg.sender == "org.freedesktop.DBus"
                and msg.member == "NameOwnerChanged" and msg.signature == "sss"
                and msg.body[0] == BUS_NAME):
            if msg.body[2]:
                log.info("the runner appeared (%s); registering %r", msg.body[2], self.subtype)
                self._spawn(self._register())
            else:
                self.registered.clear()
                log.warning("the runner went away; %r is unlisted until it comes back", self.subtype)
        return False

    async def stop(self) -> None:
        """Stop serving (in-flight commands finish), drop the bus name."""
        for task in list(self._tasks):
            task.cancel()
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.stop()
        bus, self.bus = self.bus, None
        self.registered.clear()
        if bus is not None:
            bus.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(bus.wait_for_disconnect()), _TIMEOUT_S)

    async def _call_bus(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        assert self.bus is not None
        reply = await asyncio.wait_for(self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member=member, signature=signature, body=body,
        )), _TIMEOUT_S)
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name or ErrorType.FAILED, reply.body[0] if reply.body else "")
        return list(reply.body)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def main(handler_cls: type[Handler], argv: list[str] | None = None) -> int:
    """A ``main()`` for a handler process; runs until SIGTERM or SIGINT.  Exit 1 with one
    line on stderr when it cannot start."""
    p = argparse.ArgumentParser(description=f"Serve user:{handler_cls.subtype} backstores "
                                "from this process, registered with tcmu-py-runner over D-Bus.")
    p.add_argument("--dbus-address", metavar="ADDR", help="D-Bus bus address (default: system bus)")
    p.add_argument("--no-netlink", action="store_true",
                   help="only the D-Bus half: register and answer CheckConfig, serve no device")
    p.add_argument("-d", "--debug", action="store_true", help="log at debug level")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format=f"%(asctime)s {handler_cls.subtype} [%(levelname)s] %(message)s")

    async def serve() -> None:
        ext = ExternalHandler(handler_cls, bus_address=args.dbus_address,
                              netlink=not args.no_netlink)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await ext.start()
        await stop.wait()
        await ext.stop()

    try:
        asyncio.run(serve())
    except (ExternalError, OSError) as e:
        print(f"{handler_cls.subtype}: {e}", file=sys.stderr)
        return 1
    return 0
