"""The runner: netlink events and uio discovery in, served devices out.

Start-up follows tcmu-runner (reference/tcmu.md §2.2): release netlink waiters a dead
runner left (block_netlink=1, reset_netlink=1), join TCM-USER and announce *_DONE
replies (SET_FEATURES), re-attach every live ``tcm-user`` uio device (block_dev=1,
reset_ring=1, open, map, unblock), then let netlink through again.  Every ADDED,
REMOVED and RECONFIG event gets its reply -- also when the handler fails -- because a
kernel waiter without one hangs in D state forever (§1.12).

Events are handled one at a time, in order, on the loop; blocking work (handler open,
configfs writes) runs on worker threads so the rings of other devices keep flowing.

uio add/remove uevents (pyudev, :class:`~tcmu_py.control.uio.UioMonitor`) are the second
signal: they go through the same queue and are reconciled against what netlink did.  A uio
device that appears without a netlink ADDED (after a grace period that lets the ADDED, sent
right after the uio registration, go first) is attached once; one that goes away while still
served (its REMOVED never came) is released once.  A device is never attached twice: ADDED
for a device the uevent path already attached is answered 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tcmu_py import attach
from tcmu_py.control import configfs as cfs
from tcmu_py.control import uio
from tcmu_py.control.netlink import NetlinkEvent, TcmuCmd, TcmuNetlink
from tcmu_py.control.uio import UioEvent
from tcmu_py.engine import Device, Engine
from tcmu_py.handler import Handler, split_runner_options
from tcmu_py.ring import Ring

log = logging.getLogger("tcmu_py.daemon")

__all__ = ["Runner", "Served"]

_STOP_DRAIN_S = 5.0
#: how long a uio "add" waits before it is reconciled: the kernel sends netlink ADDED right
#: after registering the uio device, so ADDED is normally handled first
UIO_ADD_GRACE_S = 2.0


def default_uio_monitor() -> Any:
    """The uio uevent monitor for this host: udevd's events when udevd runs (the /dev node
    is then ready), the kernel's own uevents otherwise (no udevd, e.g. the test guest)."""
    source = "udev" if os.path.exists("/run/udev/control") else "kernel"
    return uio.UioMonitor(source=source)


@dataclass
class Served:
    """One attached device and what identifies it to the kernel."""

    hba: int
    name: str
    minor: int
    fd: int
    device: Device

    @property
    def key(self) -> tuple[int, str]:
        return (self.hba, self.name)


class Runner:
    """Owns netlink, discovery and every served device of this host."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handlers: Mapping[str, type[Handler]],
        *,
        configfs: cfs.ConfigFS | None = None,
        uio_root: str = "/sys/class/uio",
        dev_root: str = "/dev",
        use_netlink: bool = True,
        ring_factory: Callable[[int, int], tuple[int, Ring]] | None = None,
        exclusive: bool = True,
        uio_monitor: Callable[[], Any] | None = None,
        uio_add_grace: float = UIO_ADD_GRACE_S,
    ) -> None:
        self.loop = loop
        self.handlers = dict(handlers)
        self.configfs = configfs or cfs.ConfigFS()
        self.uio_root = uio_root
        self.dev_root = dev_root
        self.use_netlink = use_netlink
        #: (minor, map_size) -> (fd, Ring); tests plug the simulated kernel in here
        self.ring_factory = ring_factory or self._open_uio
        self.engine = Engine(loop)
        self.netlink: TcmuNetlink | None = None
        self.served: dict[tuple[int, str], Served] = {}
        #: subtypes served by external processes (D-Bus RegisterHandler): not ours to answer
        self.external: set[str] = set()
        #: True for the host's runner: it owns the module-wide netlink state (block/reset at
        #: start, SET_FEATURES) and answers every event, failing subtypes nobody serves so no
        #: configfs write hangs.  False in an external handler process (tcmu_py.external): it
        #: answers only its own subtypes and leaves the module-wide state alone.
        self.exclusive = exclusive
        #: makes the uio uevent monitor (``start``/``fileno``/``poll``/``close``); None: off
        self.uio_monitor_factory = uio_monitor
        self.uio_monitor: Any = None
        self.uio_add_grace = uio_add_grace
        #: minors whose netlink ADDED was handled (served or refused): no uevent attach
        self._netlink_added: set[int] = set()
        self.counters = {"udev_attached": 0, "udev_released": 0}
        self._events: asyncio.Queue[NetlinkEvent | UioEvent | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.stopping = False

    # -- start-up ------------------------------------------------------------------------
    async def start(self, *, after_listen: Callable[[], Any] | None = None) -> None:
        """Everything up to serving; ``after_listen`` runs before netlink is unblocked
        (the D-Bus service hooks in there, as tcmu-runner unblocks after owning its name)."""
        blocked = False
        if self.use_netlink and self.exclusive:
            try:
                await self._blocking(self.configfs.set_block_netlink, True)
                await self._blocking(self.configfs.reset_netlink)
                blocked = True
            except OSError as e:
                log.warning("could not reset netlink waiters (old kernel?): %s", e)
        if self.use_netlink:
            self.netlink = TcmuNetlink()
            self.netlink.open()
            if self.exclusive:
                self.netlink.set_features(reply_supported=True)
            self.loop.add_reader(self.netlink.fileno(), self._on_netlink)
        if self.uio_monitor_factory is not None:
            # before the scan, so a device appearing during it is heard of
            try:
                mon = self.uio_monitor_factory()
                mon.start()
            except Exception as e:  # noqa: BLE001 - the second signal is optional
                log.warning("uio uevent monitor unavailable (%s); netlink only", e)
            else:
                self.uio_monitor = mon
                self.loop.add_reader(mon.fileno(), self._on_uio)
                log.info("uio uevents: listening (%s events)", getattr(mon, "source", "uio"))
        if self.netlink is not None or self.uio_monitor is not None:
            self._worker = self.loop.create_task(self._event_worker())
        for info in uio.scan(self.uio_root, self.dev_root):
            if info.subtype in self.external or info.subtype not in self.handlers:
                # maybe another process's device: re-attaching would reset its live ring
                log.log(logging.WARNING if self.exclusive else logging.DEBUG,
                        "%s (uio%d): no handler %r here (an external handler's, or its plugin "
                        "did not load); left alone", info.dev_name, info.minor, info.subtype)
                continue
            try:
                await self._attach(info.hba, info.dev_name, info.cfgstring, info.minor,
                                   info.map_size, reattach=True)
            except attach.AttachError as e:
                log.error("re-attach failed: %s", e)
        if after_listen is not None:
            res = after_listen()
            if asyncio.iscoroutine(res):
                await res
        if blocked:
            try:
                await self._blocking(self.configfs.set_block_netlink, False)
            except OSError as e:
                log.error("could not unblock netlink: %s", e)
        log.info("tcmu-py runner ready: %d device(s), handlers: %s",
                 len(self.served), ", ".join(sorted(self.handlers)))

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(None, fn, *args)

    # -- netlink -------------------------------------------------------------------------
    def _on_netlink(self) -> None:
        assert self.netlink is not None
        try:
            events = self.netlink.recv_events()
        except OSError as e:
            log.error("netlink receive failed: %s", e)
            return
        for ev in events:
            self._events.put_nowait(ev)

    def _on_uio(self) -> None:
        try:
            events = self.uio_monitor.poll()
        except OSError as e:
            log.error("uio uevent receive failed: %s", e)
            return
        for ev in events:
            if ev.action == "add":
                self.loop.call_later(self.uio_add_grace, self._events.put_nowait, ev)
            else:
                self._events.put_nowait(ev)

    async def _event_worker(self) -> None:
        while True:
            ev = await self._events.get()
            if ev is None:
                return
            if isinstance(ev, UioEvent):
                try:
                    await self.reconcile_uio(ev)
                except Exception as e:
                    log.exception("uio %s of uio%d failed: %s", ev.action, ev.minor, e)
                continue
            try:
                status = await self.handle_event(ev)
            except Exception as e:
                log.exception("netlink %s for %s failed: %s", ev.cmd.name, ev.device, e)
                status = -errno.EIO
            if status is not None and self.netlink is not None:
                try:
                    self.netlink.reply(ev, status)
                except OSError as e:
                    log.error("netlink reply for %s failed: %s", ev.device, e)

    async def handle_event(self, ev: NetlinkEvent) -> int | None:
        """Handle one event; the status to reply, or None for devices of external handlers."""
        name = uio.parse_uio_name(ev.device)
        if name is None:
            log.error("netlink event for an unparsable device %r", ev.device)
            return -errno.EINVAL
        if name.subtype in self.external:
            return None  # that process answers for its own devices (tcmu-runner #678)
        if not self.exclusive and name.subtype not in self.handlers:
            return None  # an external handler process answers only for its own subtype
        if ev.cmd == TcmuCmd.ADDED_DEVICE:
            if self.stopping:
                return -errno.ESHUTDOWN
            self._netlink_added.add(ev.minor)
            s = self.served.get((name.hba, name.dev_name))
            if s is not None and s.minor == ev.minor:
                log.info("%s: ADDED for a device already attached from its uevent", name.dev_name)
                return 0
            info = uio.read_uio(os.path.join(self.uio_root, f"uio{ev.minor}"), self.dev_root)
            if info is None:
                log.error("%s: /sys/class/uio/uio%d is not a tcm-user device", name.dev_name, ev.minor)
                return -errno.ENODEV
            try:
                await self._attach(name.hba, name.dev_name, name.cfgstring, ev.minor,
                                   info.map_size, reattach=False)
            except attach.AttachError as e:
                log.error("add refused: %s", e)
                return -_errno_of(e)
            return 0
        if ev.cmd == TcmuCmd.REMOVED_DEVICE:
            self._netlink_added.discard(ev.minor)
            s = self.served.pop((name.hba, name.dev_name), None)
            if s is not None:
                await self._detach(s)
                log.info("%s: removed", name.dev_name)
            return 0
        if ev.cmd == TcmuCmd.RECONFIG_DEVICE:
            s = self.served.get((name.hba, name.dev_name))
            if s is None:
                return -errno.ENODEV
            return await self._reconfig(s, ev)
        log.warning("netlink: ignoring command %s", ev.cmd)
        return -errno.EOPNOTSUPP

    # -- uio uevents: the second signal -------------------------------------------------------
    async def reconcile_uio(self, ev: UioEvent) -> str | None:
        """Bring ``served`` in line with a uio add/remove: "attached", "released" or None
        (nothing to do: netlink handled it, or the device is not ours)."""
        if self.stopping:
            return None
        path = os.path.join(self.uio_root, f"uio{ev.minor}")
        log.debug("uio%d %s: reconciling", ev.minor, ev.action)
        if ev.action == "add":
            if ev.minor in self._netlink_added:
                return None  # ADDED came first (served, or refused with its reply)
            info = uio.read_uio(path, self.dev_root)
            if info is None:
                return None  # gone again, or not a tcm-user device
            if (info.hba, info.dev_name) in self.served or any(
                    s.minor == ev.minor for s in self.served.values()):
                return None
            if info.subtype in self.external or info.subtype not in self.handlers:
                return None
            log.warning("%s (uio%d): appeared without a netlink ADDED; attaching it",
                        info.dev_name, ev.minor)
            try:
                await self._attach(info.hba, info.dev_name, info.cfgstring, ev.minor,
                                   info.map_size, reattach=False)
            except attach.AttachError as e:
                log.error("add (from the uevent) refused: %s", e)
                return None
            self.counters["udev_attached"] += 1
            return "attached"
        if ev.action == "remove":
            self._netlink_added.discard(ev.minor)
            s = next((s for s in self.served.values() if s.minor == ev.minor), None)
            if s is None:
                return None  # REMOVED came first, as it should
            info = uio.read_uio(path, self.dev_root)
            if info is not None and (info.hba, info.dev_name) == s.key:
                return None  # a stale event: the device at that minor is still this one
            self.served.pop(s.key, None)
            log.warning("%s (uio%d): went away without a netlink REMOVED; releasing it",
                        s.name, ev.minor)
            self.counters["udev_released"] += 1
            await self._detach(s)
            return "released"
        return None

    # -- attach / detach -------------------------------------------------------------------
    async def _attach(self, hba: int, name: str, dev_config: str, minor: int, map_size: int,
                      *, reattach: bool) -> Served:
        c = self.configfs
        try:
            geometry = attach.Geometry(
                size=await self._blocking(c.size, hba, name),
                block_size=await self._blocking(c.hw_block_size, hba, name),
                max_xfer_len=await self._blocking(c.hw_max_sectors, hba, name),
                unit_serial=await self._blocking(c.unit_serial, hba, name),
                write_cache=await self._blocking(c.emulate_write_cache, hba, name),
            )
        except OSError as e:
            raise attach.AttachError(f"{name}: cannot read its configfs attributes: {e}") from e
        if reattach:
            # §2.2: stop new commands, fail what a dead runner left in the ring
            await self._blocking(c.block_dev, hba, name, True)
            await self._blocking(c.reset_ring, hba, name, 1)
        fd = -1
        try:
            fd, ring = self.ring_factory(minor, map_size)
            try:
                prepared = await self._blocking(
                    lambda: attach.prepare(self.handlers, name=name, dev_config=dev_config,
                                           geometry=geometry, reopen=reattach)
                )
            except BaseException:
                ring.close()
                raise
            dev = attach.start(self.engine, ring, prepared)
            self._load_alua(dev, hba, name)
            dev.set_serial_source(functools.partial(c.unit_serial, hba, name))
            dev.on_corrupt = lambda d, h=hba, n=name: self._reset_corrupt(d, h, n)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            if reattach:
                try:
                    await self._blocking(c.block_dev, hba, name, False)
                except OSError as e:
                    log.error("%s: could not unblock: %s", name, e)
        s = Served(hba, name, minor, fd, dev)
        self.served[s.key] = s
        return s

    def _open_uio(self, minor: int, map_size: int) -> tuple[int, Ring]:
        path = os.path.join(self.dev_root, f"uio{minor}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise attach.AttachError(f"cannot open {path}: {e.strerror}") from e
        try:
            return fd, Ring(fd, map_size)
        except OSError as e:
            os.close(fd)
            raise attach.AttachError(f"cannot map {path}: {e.strerror}") from e

    def _load_alua(self, dev: Device, hba: int, name: str) -> None:
        try:
            groups = self.configfs.alua_groups(hba, name)
        except OSError:
            return
        from tcmu_py.scsi._model import AluaGroup

        dev.state.alua_groups = [
            AluaGroup(group_id=g.tg_pt_gp_id, state=g.alua_access_state,
                      preferred=bool(getattr(g, "preferred", False)))
            for g in groups
        ]
        dev.state.alua_implicit = any("Implicit" in str(g.alua_access_type) for g in groups)

    def _reset_corrupt(self, dev: Device, hba: int, name: str) -> None:
        """A ring the shim cannot walk: reset it (in-flight commands get BUSY and retry)."""

        async def _do() -> None:
            try:
                await self._blocking(self.configfs.reset_ring, hba, name, 1)
            except OSError as e:
                log.error("%s: reset_ring failed: %s", name, e)
                return
            dev.inflight.clear()
            dev.ring.reset()
            log.warning("%s: ring reset after a malformed entry; serving again", name)

        self.loop.create_task(_do())

    async def _detach(self, s: Served) -> None:
        dev = s.device
        self.engine.detach(dev)
        if not await dev.drain_inflight(_STOP_DRAIN_S):
            n = dev.fail_inflight()
            log.warning("%s: %d command(s) still in the handler; answered BUSY", s.name, n)
        dev.ring.flush()
        dev.native_release()
        try:
            await self._blocking(dev.handler.close)
        except Exception as e:  # noqa: BLE001 - a boundary: every failure is answered, never raised
            log.error("%s: handler close failed: %s", s.name, e)
        if dev.pool is not None:
            dev.pool.shutdown(wait=False)
        dev.ring.close()
        os.close(s.fd)

    async def _reconfig(self, s: Served, ev: NetlinkEvent) -> int:
        dev = s.device
        await dev.native_quiesce()  # the handler may remap or reopen its medium
        try:
            return await self._reconfig_handler(s, ev)
        finally:
            dev.native_acquire()

    async def _reconfig_handler(self, s: Served, ev: NetlinkEvent) -> int:
        dev = s.device
        h = dev.handler
        st = dev.state
        try:
            if ev.dev_size is not None:
                if ev.dev_size % st.block_size:
                    return -errno.EINVAL
                n = ev.dev_size // st.block_size
                if n != st.num_lbas:
                    if not hasattr(h, "reconfig") or "reconfig" not in _implemented(h):
                        return -errno.EOPNOTSUPP
                    await self._blocking(h.reconfig, "size", ev.dev_size)
                    st.num_lbas = n
                    if dev.info is not None:
                        dev.info.num_lbas = n  # a later reopen checks the new size
                    from tcmu_py.scsi import add_unit_attention

                    add_unit_attention(st, 0x2A, 0x09)  # CAPACITY DATA HAS CHANGED
                    log.info("%s: resized to %d bytes", s.name, ev.dev_size)
            if ev.dev_cfg is not None:
                if "reconfig" not in _implemented(h):
                    return -errno.EOPNOTSUPP
                _sub, handler_cfg, _opts = split_runner_options(ev.dev_cfg)
                await self._blocking(h.reconfig, "cfgstring", handler_cfg)
                st.cfgstring = ev.dev_cfg
            if ev.write_cache is not None:
                if "reconfig" in _implemented(h):
                    await self._blocking(h.reconfig, "write_cache", ev.write_cache)
                st.write_cache = bool(ev.write_cache)
        except OSError as e:
            log.error("%s: reconfig refused: %s", s.name, e)
            return -(e.errno or errno.EINVAL)
        except Exception as e:  # noqa: BLE001 - a boundary: every failure is answered, never raised
            log.error("%s: reconfig refused: %s", s.name, e)
            return -errno.EINVAL
        return 0

    # -- shutdown --------------------------------------------------------------------------
    async def stop(self) -> None:
        """SIGTERM: stop taking commands, finish or fail in-flight ones, close handlers."""
        self.stopping = True
        if self.netlink is not None:
            self.loop.remove_reader(self.netlink.fileno())
            # answer anything already queued so no configfs writer is left waiting
            for ev in self.netlink.recv_events() if _readable(self.netlink.fileno()) else []:
                self._events.put_nowait(ev)
        if self.uio_monitor is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.uio_monitor.fileno())
            self.uio_monitor.close()
            self.uio_monitor = None
        self._events.put_nowait(None)
        if self._worker is not None:
            try:
                await asyncio.wait_for(self._worker, 30)
            except TimeoutError:
                log.error("netlink event handling did not finish in 30 s")
        if self.netlink is not None:
            self.netlink.close()
            self.netlink = None
        await asyncio.gather(*(self._detach(s) for s in list(self.served.values())))
        self.served.clear()
        log.info("tcmu-py runner stopped")


def _implemented(h: Any) -> frozenset[str]:
    from tcmu_py.handler import implemented

    return implemented(type(h))


def _errno_of(e: BaseException) -> int:
    cause = e.__cause__
    if isinstance(cause, OSError) and cause.errno:
        return cause.errno
    return errno.EINVAL


def _readable(fd: int) -> bool:
    import select

    r, _, _ = select.select([fd], [], [], 0)
    return bool(r)
