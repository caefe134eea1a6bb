"""The runner's D-Bus service ``org.kernel.TCMUService1`` (dbus-next, asyncio).

targetcli knows ``user:`` backstores only through this service (reference/tcmu.md
§2.11; lab/kernel/README.md): it calls GetManagedObjects on the ObjectManager at
``/org/kernel/TCMUService1`` and shows every object returned as ``user:<last path
element>``, prints its ``ConfigDesc`` for ``help create``, and creates a backstore
only after ``CheckConfig(<subtype>/<cfg>)`` on that object said yes.  Handlers that run
in their own process join through ``HandlerManager1.RegisterHandler``: the runner then
forwards their CheckConfig and leaves their devices' netlink events to them.

Where this deliberately differs from dbus-next's defaults, and from tcmu-runner:

* dbus-next answers GetManagedObjects on any path with *every* object below it, which
  targetcli would show as a phantom ``user:HandlerManager1``.  The service answers it
  itself, at the manager path only, with exactly one object per handler (tcmu-runner gets
  the same by exporting HandlerManager1 outside its GDBusObjectManagerServer).
* CheckConfig really parses (tcmu-runner answers "success" for every in-tree handler since
  the 2017 audit removed their checks), and its untrusted argument is bounded first
  (:func:`tcmu_py.dbus_api.config_problem`).
* RegisterHandler checks the caller's uid itself instead of trusting the bus policy alone:
  Debian's tcmu-runner policy file, if installed, lets everyone send to this name.
* No method lets a Python traceback reach a caller: each answers ``(false, reason)`` or a
  named D-Bus error.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from dbus_next import BusType, DBusError, Message, MessageFlag, MessageType, NameFlag, Variant
from dbus_next.aio import MessageBus
from dbus_next.constants import ErrorType, PropertyAccess, RequestNameReply
from dbus_next.service import ServiceInterface, dbus_property, method

from tcmu_py.daemon import Runner
from tcmu_py.dbus_api import (
    BUS_NAME,
    EXTERNAL_NAME_PREFIX,
    HANDLER_IFACE,
    MANAGER_IFACE,
    MANAGER_PATH,
    MAX_DESC_CHARS,
    OBJECT_PATH,
    clip,
    config_problem,
    external_name,
    external_path,
    handler_path,
    subtype_problem,
)
from tcmu_py.handler import Handler, check_config

__all__ = [
    "FORWARD_TIMEOUT_S",
    "HandlerObject",
    "Service",
    "ServiceBus",
    "ServiceError",
    "local_check",
    "start_service",
]

log = logging.getLogger("tcmu_py.dbus")

#: How long a forwarded CheckConfig may take; targetcli itself waits 25 s (GDBus default).
FORWARD_TIMEOUT_S = 10.0
_BUS_TIMEOUT_S = 10.0
_OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
_NOT_SUPPORTED = ErrorType.NOT_SUPPORTED.value
#: Methods targetcli may call on a handler object that this runner does not serve, with
#: what to do instead (tcmu-runner PR #411 proposed ChangeMedium; it was never merged).
_UNSERVED = {
    "ChangeMedium": "delete the backstore and create it again with the new cfgstring",
}

CheckFn = Callable[[str], Awaitable[tuple[bool, str]]]


class ServiceError(Exception):
    """The service cannot start; the text is one line naming the cause and the fix."""


class HandlerObject(ServiceInterface):
    """One ``/org/kernel/TCMUService1/<subtype>`` object: ``ConfigDesc`` and ``CheckConfig``.

    ``check`` does the work: the handler's own ``parse_config`` for a handler of this
    runner, a forwarded call for an external one.  Also what an external handler process
    exports at ``/org/kernel/TCMUService1/HandlerManager1/<subtype>``.
    """

    def __init__(self, cfg_desc: str, check: CheckFn) -> None:
        super().__init__(HANDLER_IFACE)
        self.cfg_desc = cfg_desc
        self._check = check

    # dbus-next reads D-Bus signatures from these string annotations; mypy cannot.
    @method()
    async def CheckConfig(self, configstr: "s") -> "bs":  # type: ignore[name-defined] # noqa: F821
        try:
            ok, reason = await self._check(configstr)
        except Exception as e:  # noqa: BLE001 - a boundary: every failure is answered, never raised
            log.error("CheckConfig failed: %s: %s", type(e).__name__, e)
            return [False, f"CheckConfig failed: {type(e).__name__}"]
        return [bool(ok), clip(str(reason))]

    @dbus_property(access=PropertyAccess.READ)
    def ConfigDesc(self) -> "s":  # type: ignore[name-defined] # noqa: F821
        return self.cfg_desc


class _HandlerManager(ServiceInterface):
    """``/org/kernel/TCMUService1/HandlerManager1``: exported for introspection only.

    RegisterHandler needs the caller's unique name, which a dbus-next method does not
    get, so :class:`Service` answers the call from its message filter before it gets here.
    """

    def __init__(self) -> None:
        super().__init__(MANAGER_IFACE)

    @method()
    def RegisterHandler(self, subtype: "s", cfgstr_desc: "s") -> "bs":  # type: ignore[name-defined] # noqa: F821
        return [False, "RegisterHandler was not routed through the service"]  # never reached


def local_check(handler_cls: type[Handler]) -> CheckFn:
    """CheckConfig for a handler of this process: the bounds, then its ``parse_config``."""

    async def check(configstr: str) -> tuple[bool, str]:
        rest, why = config_problem(handler_cls.subtype, configstr)
        if why is not None:
            return False, why
        return check_config(handler_cls, rest)

    return check


@dataclass
class _External:
    """A registered external handler: who owns it and what we exported for it."""

    subtype: str
    owner: str  # the unique name that registered; only it is trusted for this subtype
    match_rule: str
    obj: HandlerObject | None = None  # None while the registration is being checked


class ServiceBus(MessageBus):
    """dbus-next 0.2.3's asyncio bus with two of its habits fixed (private hooks, both
    harmless no-ops should a later dbus-next rename them).

    * Its built-in handlers (Properties, Introspect...) answer a bad call with a D-Bus error
      and then *also* let the exception escape: a traceback at ERROR level in our log for
      every such call, e.g. each time targetcli proxies the ObjectManager path (Gio asks it
      for properties), and a log flood anyone on the bus could cause.  Here the error reply
      is the end of it.
    * It emits ``InterfacesAdded``/``Removed`` from the object's own path, where
      ObjectManager clients do not listen; the service emits them from the manager path.
    """

    def _send_reply(self, msg: Message) -> Any:
        reply = super()._send_reply(msg)

        class SendReply(type(reply)):  # type: ignore[misc]
            def __exit__(self, exc_type: Any, exc_value: Any, tb: Any) -> bool:
                return bool(self._exit(exc_type, exc_value, tb))  # True: answered, swallowed

        reply.__class__ = SendReply
        return reply

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        pass

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        pass


class Service:
    """``org.kernel.TCMUService1`` for one :class:`~tcmu_py.daemon.Runner`.

    ``register_uids`` are the callers allowed to RegisterHandler (root); ``runner.handlers``
    are published as they are at :meth:`start`.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        register_uids: frozenset[int] = frozenset({0}),
        forward_timeout: float = FORWARD_TIMEOUT_S,
    ) -> None:
        self.runner = runner
        self.register_uids = register_uids
        self.forward_timeout = forward_timeout
        self.bus: MessageBus | None = None
        self.where = "the system bus"
        #: subtype -> exported object, for this runner's handlers and external ones
        self.objects: dict[str, HandlerObject] = {}
        self.external: dict[str, _External] = {}
        self._register_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None

    # -- life cycle ------------------------------------------------------------------------
    async def start(self, address: str | None = None) -> None:
        """Connect, export the objects, then own the name (so no caller sees half a service)."""
        if address:
            self.where = f"the D-Bus bus at {address}"
        try:  # dbus-next opens the socket in the constructor already
            bus = ServiceBus(bus_address=address) if address else ServiceBus(bus_type=BusType.SYSTEM)
            await asyncio.wait_for(bus.connect(), _BUS_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a boundary: every failure is answered, never raised
            raise ServiceError(
                f"cannot connect to {self.where}: {_describe(e)} (is dbus running?)"
            ) from None
        self.bus = bus
        try:
            self._export_handlers(bus)
            bus.export(MANAGER_PATH, _HandlerManager())
            bus.add_message_handler(self._on_message)
            await self._own_name(bus)
        except BaseException:
            bus.disconnect()
            self.bus = None
            raise
        # not in _tasks: stop() must not cancel it, that would cancel dbus-next's own future
        self._watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(bus))
        log.info("D-Bus: %s on %s: handlers %s", BUS_NAME, self.where, ", ".join(sorted(self.objects)))

    async def stop(self) -> None:
        """Drop the name and every object; external subtypes are forgotten."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        bus, self.bus = self.bus, None
        for ext in list(self.external.values()):
            self.runner.external.discard(ext.subtype)
        self.external.clear()
        if bus is not None:
            bus.disconnect()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(bus.wait_for_disconnect()), _BUS_TIMEOUT_S)
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._watcher, _BUS_TIMEOUT_S)
        log.info("D-Bus: %s released", BUS_NAME)

    def _export_handlers(self, bus: MessageBus) -> None:
        for subtype, cls in sorted(self.runner.handlers.items()):
            why = subtype_problem(subtype)
            if why is not None:
                log.warning("handler %r is not published on D-Bus: %s; targetcli cannot create "
                            "its backstores (rtslib can)", subtype, why)
                continue
            obj = HandlerObject(cls.cfg_desc, local_check(cls))
            bus.export(handler_path(subtype), obj)
            self.objects[subtype] = obj

    async def _own_name(self, bus: MessageBus) -> None:
        try:
            reply = await asyncio.wait_for(
                bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE), _BUS_TIMEOUT_S
            )
        except DBusError as e:
            if e.type == ErrorType.ACCESS_DENIED.value:
                raise ServiceError(
                    f"{self.where} does not let this process own {BUS_NAME}: run as root, with "
                    "the D-Bus policy installed (scripts/install-service.sh)"
                ) from None
            raise ServiceError(f"cannot own {BUS_NAME} on {self.where}: {e.text}") from None
        except TimeoutError:
            raise ServiceError(f"{self.where} did not answer RequestName({BUS_NAME})") from None
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            who = await self._describe_owner(BUS_NAME)
            raise ServiceError(
                f"{BUS_NAME} is already owned on {self.where} by {who}: another tcmu-runner or "
                "tcmu-py-runner is serving; stop it first (only one runner may serve a host)"
            )

    async def _describe_owner(self, name: str) -> str:
        try:
            (pid,) = await self._call_bus("GetConnectionUnixProcessID", "s", [name])
        except Exception:  # noqa: BLE001 - only improves an error message
            return "another process"
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f"pid {pid} ({f.read().strip()})"
        except OSError:
            return f"pid {pid}"

    async def _watch_disconnect(self, bus: MessageBus) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(bus.wait_for_disconnect())
        if not self._stopping:
            log.error("D-Bus: lost the connection to %s; targetcli can no longer see this runner "
                      "(restart it to reconnect)", self.where)

    # -- incoming messages ---------------------------------------------------------------
    def _on_message(self, msg: Message) -> Message | bool:
        """dbus-next's message filter: what the service answers itself, before dispatch."""
        if msg.message_type == MessageType.SIGNAL:
            if (msg.sender == "org.freedesktop.DBus" and msg.member == "NameOwnerChanged"
                    and msg.signature == "sss"):
                self._name_owner_changed(*msg.body)
            return False
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        if msg.member == "GetManagedObjects" and msg.interface in (_OBJECT_MANAGER, None):
            return self._reply(msg, self._managed_objects(msg))
        if (msg.path == OBJECT_PATH and msg.interface == "org.freedesktop.DBus.Properties"
                and msg.member == "GetAll" and msg.body == [_OBJECT_MANAGER]):
            # a Gio proxy of the manager (targetcli's) loads its properties: it has none
            return self._reply(msg, Message.new_method_return(msg, "a{sv}", [{}]))
        if msg.path == MANAGER_PATH and msg.member == "RegisterHandler" and \
                msg.interface in (MANAGER_IFACE, None) and msg.signature == "ss":
            self._spawn(self._register(msg))
            return True
        if msg.member in _UNSERVED and msg.interface in (HANDLER_IFACE, None) and \
                msg.path.startswith(OBJECT_PATH + "/") and msg.path != MANAGER_PATH:
            text = (f"{HANDLER_IFACE}.{msg.member} is not supported by tcmu-py-runner: "
                    f"{_UNSERVED[msg.member]}")
            return self._reply(msg, Message.new_error(msg, _NOT_SUPPORTED, text))
        return False

    @staticmethod
    def _reply(call: Message, reply: Message) -> Message | bool:
        return True if call.flags & MessageFlag.NO_REPLY_EXPECTED else reply

    def _managed_objects(self, msg: Message) -> Message:
        if msg.path != OBJECT_PATH:
            return Message.new_error(msg, ErrorType.UNKNOWN_METHOD.value,
                                     f"no ObjectManager at {msg.path} (it is at {OBJECT_PATH})")
        body = {handler_path(s): _interfaces(obj) for s, obj in sorted(self.objects.items())}
        return Message.new_method_return(msg, "a{oa{sa{sv}}}", [body])

    # -- external handlers ---------------------------------------------------------------
    async def _register(self, msg: Message) -> None:
        subtype, cfg_desc = msg.body
        try:
            ok, text = await self._try_register(msg.sender, subtype, cfg_desc)
        except Exception as e:  # noqa: BLE001 - a boundary: every failure is answered, never raised
            log.error("RegisterHandler(%r) failed: %s", clip(subtype, 80), _describe(e))
            ok, text = False, f"RegisterHandler failed: {_describe(e)}"
        if not ok:
            log.warning("RegisterHandler(%r) from %s refused: %s", clip(subtype, 80), msg.sender, text)
        if self.bus is not None and not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.bus.send(Message.new_method_return(msg, "bs", [ok, text]))

    async def _try_register(self, sender: str, subtype: str, cfg_desc: str) -> tuple[bool, str]:
        why = subtype_problem(subtype)
        if why is not None:
            return False, why
        if subtype in self.runner.handlers:
            return False, (f"subtype {subtype!r} is served by tcmu-py-runner itself; an external "
                           "handler needs a subtype of its own")
        if len(cfg_desc) > MAX_DESC_CHARS:
            return False, f"cfg_desc too long: {len(cfg_desc)} characters (at most {MAX_DESC_CHARS})"
        (uid,) = await self._call_bus("GetConnectionUnixUser", "s", [sender])
        if uid not in self.register_uids:
            return False, f"RegisterHandler: uid {uid} may not register handlers (only root may)"
        async with self._register_lock:
            ext = self.external.get(subtype)
            if ext is not None:
                if ext.owner == sender:
                    return True, "already registered"
                return False, f"subtype {subtype!r} is already registered by {ext.owner}"
            name = external_name(subtype)
            # Watch first, then look: the pending entry is dropped by a NameOwnerChanged
            # that arrives meanwhile, so a name that vanishes in between is never exported.
            rule = (f"type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                    f"member='NameOwnerChanged',arg0='{name}'")
            ext = self.external[subtype] = _External(subtype, sender, rule)
            try:
                await self._call_bus("AddMatch", "s", [rule])
                try:
                    (owner,) = await self._call_bus("GetNameOwner", "s", [name])
                except DBusError:
                    owner = None
            except BaseException:
                self._forget(ext)
                raise
            vanished = self.external.get(subtype) is not ext  # already forgotten
            if vanished or owner != sender:
                if not vanished:
                    self._forget(ext)
                if vanished or owner is None:
                    return False, f"Cannot find handler bus name: {name} (own it, then register)"
                return False, f"{name} is owned by {owner}, not by the caller"
            assert self.bus is not None
            ext.obj = HandlerObject(cfg_desc, self._forwarder(subtype, sender))
            self.bus.export(handler_path(subtype), ext.obj)
            self.objects[subtype] = ext.obj
            self.runner.external.add(subtype)
            self._object_signal("InterfacesAdded", subtype, ext.obj)
        log.info("external handler %r registered by %s; its devices are left to it", subtype, sender)
        return True, "succeeded"

    def _name_owner_changed(self, name: str, old: str, new: str) -> None:
        if not name.startswith(EXTERNAL_NAME_PREFIX):
            return
        ext = self.external.get(name[len(EXTERNAL_NAME_PREFIX) :])
        if ext is None or new == ext.owner:
            return
        was_served = ext.obj is not None
        self._forget(ext)
        if was_served:
            log.warning("external handler %r is gone (%s %s); its backstores are no longer served",
                        ext.subtype, name, "released" if not new else f"moved to {new}")

    def _forget(self, ext: _External) -> None:
        """Drop an external handler, registered or pending: object, subtype, match rule."""
        if self.external.get(ext.subtype) is ext:
            del self.external[ext.subtype]
        if ext.obj is not None:
            self.objects.pop(ext.subtype, None)
            self.runner.external.discard(ext.subtype)
            if self.bus is not None:
                self.bus.unexport(handler_path(ext.subtype), ext.obj)
                self._object_signal("InterfacesRemoved", ext.subtype, ext.obj)
            ext.obj = None
        if self.bus is not None:
            self._spawn(self._call_bus("RemoveMatch", "s", [ext.match_rule]))

    def _forwarder(self, subtype: str, owner: str) -> CheckFn:
        """CheckConfig of an external handler: bounded here, answered by its process."""

        async def check(configstr: str) -> tuple[bool, str]:
            _, why = config_problem(subtype, configstr)
            if why is not None:
                return False, why
            if self.bus is None:
                return False, "the runner is stopping"
            call = Message(destination=owner, path=external_path(subtype), interface=HANDLER_IFACE,
                           member="CheckConfig", signature="s", body=[configstr])
            try:
                reply = await asyncio.wait_for(self.bus.call(call), self.forward_timeout)
            except TimeoutError:
                return False, (f"the external handler {subtype!r} did not answer CheckConfig "
                               f"within {self.forward_timeout:g} s")
            if reply is None or reply.message_type == MessageType.ERROR:
                text = reply.body[0] if reply is not None and reply.signature == "s" else ""
                err = reply.error_name if reply is not None else "no reply"
                return False, f"the external handler {subtype!r} failed CheckConfig: {err}: {clip(text)}"
            if reply.signature != "bs":
                return False, (f"the external handler {subtype!r} answered CheckConfig with "
                               f"signature {reply.signature!r}, not 'bs'")
            ok, reason = reply.body
            return bool(ok), clip(reason)

        return check

    # -- helpers -------------------------------------------------------------------------
    def _object_signal(self, member: str, subtype: str, obj: HandlerObject) -> None:
        """ObjectManager signals, from the manager's path where clients listen for them."""
        if self.bus is None:
            return
        path = handler_path(subtype)
        if member == "InterfacesAdded":
            sig = Message.new_signal(OBJECT_PATH, _OBJECT_MANAGER, member, "oa{sa{sv}}",
                                     [path, _interfaces(obj)])
        else:
            sig = Message.new_signal(OBJECT_PATH, _OBJECT_MANAGER, member, "oas", [path, [HANDLER_IFACE]])
        self.bus.send(sig)

    async def _call_bus(self, member: str, signature: str, body: list[Any]) -> list[Any]:
        """Call the bus daemon itself; a D-Bus error is raised as :class:`DBusError`."""
        if self.bus is None:
            raise DBusError(ErrorType.DISCONNECTED, "the service is stopped")
        reply = await asyncio.wait_for(
            self.bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                  interface="org.freedesktop.DBus", member=member,
                                  signature=signature, body=body)),
            _BUS_TIMEOUT_S,
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name or ErrorType.FAILED, reply.body[0] if reply.body else "")
        return list(reply.body)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("D-Bus background task failed: %s", _describe(task.exception()))


def _interfaces(obj: HandlerObject) -> dict[str, dict[str, Variant]]:
    return {HANDLER_IFACE: {"ConfigDesc": Variant("s", obj.cfg_desc)}}


def _describe(e: BaseException | None) -> str:
    if isinstance(e, DBusError):
        return f"{e.type}: {e.text}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def start_service(runner: Runner, address: str | None = None, **kw: Any) -> Service:
    """Publish ``runner``'s handlers as ``org.kernel.TCMUService1`` on the bus at ``address``
    (None: the system bus).  Raises :class:`ServiceError` with a one-line reason."""
    service = Service(runner, **kw)
    await service.start(address)
    return service
