"""The handler contract: what a storage handler provides, and what the runner may ask of it.

A handler is a class, one instance per device.  The runner parses the config string with
the class's :meth:`Handler.parse_config`, creates the instance, calls :meth:`Handler.open`
with a :class:`DeviceInfo`, then sends it byte-addressed I/O until :meth:`Handler.close`.
It covers tcmu-runner's ``struct tcmur_handler`` (reference/tcmu.md §2.5) with the shape
of nbdkit's Python plugin (reference/models.md §3): a tiny required core, optional
methods whose presence *is* the capability (discovered once per class), ``can_*``
overrides evaluated per device, a declared thread model and a versioned API.

This module also holds the two pure helpers every layer needs: splitting the kernel's
``dev_config`` into subtype, handler part and runner options exactly as tcmu-runner
does (§2.13), and turning an exception raised by a handler into SCSI sense.
"""

from __future__ import annotations

import errno
import importlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias, TypeVar

from tcmu_py.scsi._model import Caps, SenseError, SenseKey

__all__ = [
    "EVENTS",
    "HANDLER_API",
    "LOCK_STATES",
    "OPTIONAL_METHODS",
    "RECONFIG_KEYS",
    "RUNNER_OPTIONS",
    "THREAD_MODELS",
    "ConfigError",
    "DeviceInfo",
    "Handler",
    "IoResult",
    "capabilities",
    "check_config",
    "exception_to_sense",
    "implemented",
    "opt_bool",
    "opt_int",
    "parse_options",
    "pool_size",
    "problems",
    "split_runner_options",
]

log = logging.getLogger("tcmu_py.handler")

#: Version of this contract.  Bumped only for incompatible changes; a plugin declaring
#: another version is refused at load (nbdkit's ``API_VERSION``).
HANDLER_API = 1

THREAD_MODELS = frozenset({"inline", "threads", "async"})

#: What :meth:`Handler.reconfig` may be asked to change (tcmulib_cfg_info types, §2.4).
RECONFIG_KEYS = frozenset({"size", "cfgstring", "write_cache"})

#: Events passed to :meth:`Handler.report_event` (``enum tcmur_event``, §2.5).
EVENTS = frozenset({"lock_lost", "conn_lost", "cmd_timed_out"})

#: Answers of :meth:`Handler.get_lock_state` (``TCMUR_DEV_LOCK_*``, §2.5).
LOCK_STATES = frozenset(
    {"unknown", "unlocked", "read_locking", "read_locked", "write_locking", "write_locked"}
)

#: What an I/O method returns: ``None`` when done (inline and threads models), or an
#: awaitable the engine waits for (async model).
IoResult: TypeAlias = Awaitable[None] | None

_F = TypeVar("_F", bound=Callable[..., Any])


class ConfigError(ValueError):
    """A config string the handler cannot accept; the message names the bad token.

    The text goes verbatim to targetcli through D-Bus ``CheckConfig`` and into the log,
    so it must tell a person what to change (style.md §11).
    """

    def __init__(self, token: str, reason: str) -> None:
        super().__init__(f"{token!r}: {reason}")
        self.token = token
        self.reason = reason


@dataclass
class DeviceInfo:
    """What :meth:`Handler.open` learns about its device.

    ``cfgstring`` is the handler part of the kernel's ``dev_config`` (the text after
    ``<subtype>/``, runner options removed): ``/tmp/x.img;threads=4`` for
    ``file//tmp/x.img;threads=4``.  ``config`` is what ``parse_config`` made of it.
    ``max_xfer_len`` is in blocks (configfs ``hw_max_sectors``).
    """

    name: str
    cfgstring: str
    config: Any
    block_size: int
    num_lbas: int
    max_xfer_len: int = 128
    write_cache: bool = False
    unit_serial: str = ""

    @property
    def size(self) -> int:
        """The device size in bytes."""
        return self.block_size * self.num_lbas


def _optional(func: _F) -> _F:
    """Mark a base-class placeholder: a class that does not override it lacks the feature."""
    func.__tcmu_optional__ = True  # type: ignore[attr-defined]
    return func


class Handler:
    """Base class of every handler.  Subclass it, set ``subtype``, implement read and write.

    **Lifecycle.**  ``parse_config`` (a classmethod, also used by D-Bus ``CheckConfig``),
    then ``cls()`` and ``open(dev, reopen)`` per device, I/O, ``close()``.  After a
    connection loss the runner calls ``close()`` and ``open(dev, reopen=True)`` on the
    same instance.  Keep per-device state on the instance, never in module globals.

    **Offsets and lengths** are in bytes, always whole blocks and always inside the
    device: the SCSI layer has already refused anything out of range.

    **Thread model** (``thread_model``):

    * ``"inline"`` -- I/O methods run in the event-loop thread.  They must not block;
      right for memory copies (``ram``).
    * ``"threads"`` -- I/O methods run on a per-device pool of ``threads`` workers, so
      they may block; the pool size can be set per device with ``;threads=N`` if
      ``parse_config`` accepts it and exposes it as ``config.threads`` (``file``).
    * ``"async"`` -- I/O methods start the operation and return an awaitable: a
      coroutine, or an ``asyncio.Future`` made with ``loop.create_future()`` and
      resolved from library callbacks through ``loop.call_soon_threadsafe`` (``rbd``).
      Only the loop thread touches the ring (style.md §7).

    **Errors.**  Raise :class:`~tcmu_py.scsi._model.SenseError` to choose the SCSI
    answer, or let an ``OSError`` through: its errno is mapped at the boundary (EIO →
    MEDIUM ERROR, ENOSPC → SPACE ALLOCATION FAILED, ...).  Any other exception is a bug:
    it is logged once, naming the handler and the method, the command ends with
    HARDWARE ERROR and the device keeps serving.

    **Optional methods** exist only if a subclass overrides them; their presence is the
    capability (UNMAP → LBPME/LBPU, flush → SYNCHRONIZE CACHE, ...).  A handler that
    has the method but cannot use it on one device says so with ``can_<name>()``
    returning False, evaluated once after ``open``.
    """

    #: The name in ``user:<subtype>`` and before the first ``/`` of the config string.
    subtype: ClassVar[str]
    #: Help text for the config string (D-Bus ``ConfigDesc``).
    cfg_desc: ClassVar[str] = ""
    api_version: ClassVar[int] = HANDLER_API
    thread_model: ClassVar[str] = "inline"
    #: Worker pool size for the "threads" model (tcmu-runner's ``nr_threads``).
    threads: ClassVar[int] = 2
    #: True if ``write(fua=True)`` makes the data durable itself; otherwise the engine
    #: follows a FUA write with ``flush()``.
    native_fua: ClassVar[bool] = False

    #: Unmapped blocks read back as zeroes (READ CAPACITY 16 LBPRZ, VPD 0xB2).  Set it
    #: in ``open`` only when it is true for this device.
    lbprz: bool = False
    #: The device refuses writes (MODE SENSE WP; writes fail with DATA PROTECT before
    #: reaching the handler).  A class that sets it True need not implement ``write``.
    readonly: bool = False

    dev: DeviceInfo

    # ---- configuration -------------------------------------------------------------

    @classmethod
    def parse_config(cls, cfgstring: str) -> Any:
        """Check and parse the handler part of the config string, without side effects.

        Shared by D-Bus ``CheckConfig`` (which has no device) and device open, so it
        must not open files or connect anywhere.  Raise :class:`ConfigError` naming the
        bad token.  The default accepts any string and returns it unchanged.
        """
        return cfgstring

    # ---- lifecycle -----------------------------------------------------------------

    def open(self, dev: DeviceInfo, reopen: bool) -> None:
        """Attach to the backing store of ``dev``; ``reopen`` is True during recovery.

        Raise to refuse the device (the error text is logged as the reason).  The
        default just keeps ``dev`` as ``self.dev``; overrides should do the same, since
        the runner reads ``self.dev.config`` for per-device options.
        """
        self.dev = dev

    def close(self) -> None:
        """Release what ``open`` took.  Called once per successful ``open``."""

    # ---- required I/O --------------------------------------------------------------

    def read(self, offset: int, length: int, bufs: Sequence[memoryview]) -> IoResult:
        """Fill ``bufs`` (views of the ring, ``length`` bytes in total) from ``offset``.

        Write straight into the views (``os.preadv``, slice assignment): they are the
        initiator's data area, so no copy is needed and none should be made.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement read()")

    def write(self, offset: int, length: int, bufs: Sequence[memoryview], fua: bool) -> IoResult:
        """Store ``length`` bytes from ``bufs`` at ``offset``.

        With ``fua`` and ``native_fua`` the data must be durable before returning (or
        before the awaitable completes).  Do not keep references to ``bufs`` after
        completion: the ring reuses that memory.
        """
        raise OSError(errno.EROFS, f"{type(self).__name__} is read-only")

    # ---- optional ------------------------------------------------------------------

    @_optional
    def flush(self) -> IoResult:
        """Make every completed write durable (SYNCHRONIZE CACHE)."""
        raise NotImplementedError

    @_optional
    def unmap(self, offset: int, length: int) -> IoResult:
        """Deallocate the range (UNMAP).  Reads of it return zeroes only if ``lbprz``."""
        raise NotImplementedError

    @_optional
    def write_same(self, offset: int, length: int, pattern: bytes, unmap: bool) -> IoResult:
        """Write ``pattern`` (one block) over the range; without it the engine emulates.

        ``unmap`` is the WRITE SAME UNMAP bit: the handler *may* deallocate instead of
        writing, but only if reads then return ``pattern``.
        """
        raise NotImplementedError

    @_optional
    def compare_and_write(self, offset: int, compare: bytes, write: bytes) -> IoResult:
        """Atomically: if the data at ``offset`` equals ``compare``, write ``write``.

        On a mismatch raise ``SenseError(SenseKey.MISCOMPARE, 0x1D, info=n)`` with ``n``
        the byte offset of the first difference.  Without this method the engine does a
        read-compare-write under a per-device lock.
        """
        raise NotImplementedError

    @_optional
    def reconfig(self, what: str, value: Any) -> None:
        """Apply a live change; ``what`` is one of :data:`RECONFIG_KEYS`.

        ``"size"``: the new size in bytes; ``"cfgstring"``: the new handler part of the
        config string; ``"write_cache"``: bool.  Raise (``OSError`` or
        :class:`ConfigError`) to refuse; the runner then keeps the old setting.
        """
        raise NotImplementedError

    @_optional
    def native_memory(self) -> memoryview:
        """The medium itself as one writable buffer of at least the device's size.

        The runner then serves plain READ/WRITE (10)/(16) in C straight from it -- one
        memcpy per command, no Python call -- and calls ``read``/``write`` only for what
        that path leaves to the SCSI layer.  The buffer must stay valid until ``close``
        or ``reconfig`` (the runner takes it back before either) and hold nothing
        volatile: a FUA write to it needs no flush.
        """
        raise NotImplementedError

    @_optional
    def native_fd(self) -> tuple[int, bool] | None:
        """``(fd, write_through)``: the open medium, for the runner's C worker threads.

        They serve plain READ/WRITE (10)/(16) with preadv/pwritev at byte offset
        LBA x block size straight between the ring and ``fd`` (one syscall per command,
        no Python call), fdatasync after a FUA write and, with ``write_through``, after
        every write.  ``fd`` must stay open until ``close`` or ``reconfig`` (the runner
        waits for its jobs and takes it back before either).  None: not this time.
        """
        raise NotImplementedError

    @_optional
    def report_event(self, event: str) -> None:
        """Be told of an event in :data:`EVENTS` (rbd updates its service status)."""
        raise NotImplementedError

    # ALUA implicit-failover lock (§2.8).  Implement all four or none.

    @_optional
    def lock(self, tag: int) -> IoResult:
        """Take the exclusive lock for target port group ``tag``."""
        raise NotImplementedError

    @_optional
    def unlock(self) -> IoResult:
        """Release the lock taken by :meth:`lock`."""
        raise NotImplementedError

    @_optional
    def get_lock_tag(self) -> int | None:
        """The port group id of the current lock holder, or None if nobody holds it."""
        raise NotImplementedError

    @_optional
    def get_lock_state(self) -> str:
        """This device's lock state, one of :data:`LOCK_STATES`."""
        raise NotImplementedError


#: Optional methods in the order the documentation lists them.
OPTIONAL_METHODS = (
    "flush",
    "unmap",
    "write_same",
    "compare_and_write",
    "reconfig",
    "native_memory",
    "native_fd",
    "report_event",
    "lock",
    "unlock",
    "get_lock_tag",
    "get_lock_state",
)
_LOCK_METHODS = frozenset({"lock", "unlock", "get_lock_tag", "get_lock_state"})


def _overrides(cls: type, name: str) -> bool:
    attr = getattr(cls, name, None)
    return callable(attr) and not getattr(attr, "__tcmu_optional__", False)


_implemented: weakref.WeakKeyDictionary[type[Handler], frozenset[str]] = weakref.WeakKeyDictionary()


def implemented(handler_cls: type[Handler]) -> frozenset[str]:
    """The optional methods ``handler_cls`` implements; computed once per class."""
    found = _implemented.get(handler_cls)
    if found is None:
        found = frozenset(name for name in OPTIONAL_METHODS if _overrides(handler_cls, name))
        _implemented[handler_cls] = found
    return found


def problems(handler_cls: object) -> list[str]:
    """What makes ``handler_cls`` unusable as a handler (empty if nothing).

    The registry reports these when it skips a plugin, so each names what to fix.
    """
    if not isinstance(handler_cls, type) or not issubclass(handler_cls, Handler):
        return [f"{handler_cls!r} is not a subclass of tcmu_py.handler.Handler"]
    found: list[str] = []
    api = getattr(handler_cls, "api_version", None)
    if api != HANDLER_API:
        found.append(f"api_version is {api!r}, this runner speaks HANDLER_API {HANDLER_API}")
    subtype = getattr(handler_cls, "subtype", None)
    if not isinstance(subtype, str) or not subtype:
        found.append("no subtype (set the class attribute subtype = 'name')")
    elif "/" in subtype or ";" in subtype or not subtype.isprintable():
        found.append(f"subtype {subtype!r} may not contain '/', ';' or control characters")
    if handler_cls.thread_model not in THREAD_MODELS:
        found.append(
            f"thread_model {handler_cls.thread_model!r} is not one of {sorted(THREAD_MODELS)}"
        )
    threads = handler_cls.threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        found.append(f"threads must be a positive int, not {threads!r}")
    if not isinstance(handler_cls.cfg_desc, str):
        found.append("cfg_desc must be a str")
    if handler_cls.read is Handler.read:
        found.append("read() is not implemented")
    if handler_cls.write is Handler.write and handler_cls.readonly is not True:
        found.append("write() is not implemented (or set readonly = True)")
    locks = implemented(handler_cls) & _LOCK_METHODS
    if locks and locks != _LOCK_METHODS:
        missing = ", ".join(sorted(_LOCK_METHODS - locks))
        found.append(f"implements some ALUA lock methods but not {missing}")
    return found


def _config_value(config: Any, key: str) -> Any:
    """``config.key`` or ``config[key]``: handlers expose options either way."""
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def capabilities(handler_cls: type[Handler], instance: Handler, config: Any = None) -> Caps:
    """The SCSI-visible capabilities of one opened device.

    Method presence comes from :func:`implemented` (once per class); ``can_<name>()``
    is asked now, after ``open``, so a handler can drop a feature its backing store
    lacks (no hole punching on this filesystem).  ``config`` defaults to the parsed
    config the instance was opened with.
    """
    have = implemented(handler_cls)

    def can(name: str) -> bool:
        if name not in have:
            return False
        check = getattr(instance, f"can_{name}", None)
        return True if check is None else bool(check())

    if config is None:
        dev = getattr(instance, "dev", None)
        config = dev.config if dev is not None else None
    unmap = can("unmap")
    return Caps(
        flush=can("flush"),
        unmap=unmap,
        write_same=can("write_same"),
        caw=can("compare_and_write"),
        # LBPRZ without UNMAP would promise something no command can observe
        lbprz=unmap and bool(instance.lbprz),
        fua=bool(handler_cls.native_fua),
        readonly=bool(instance.readonly or _config_value(config, "readonly")),
    )


def pool_size(handler_cls: type[Handler], config: Any) -> int:
    """Worker threads for a "threads" device: ``config.threads`` if set, else the class's."""
    n = _config_value(config, "threads")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else handler_cls.threads


def check_config(handler_cls: type[Handler], cfgstring: str) -> tuple[bool, str]:
    """D-Bus ``CheckConfig``: ``(True, "success")`` or ``(False, reason)``.

    ``cfgstring`` is the handler part of what targetcli sends (targetcli sends the whole
    ``<subtype>/<cfg>``; :mod:`tcmu_py.dbus_service` checks and strips the ``<subtype>/``),
    possibly with runner options in front; those are checked and stripped as at device add.
    """
    try:
        _, handler_cfg, _ = split_runner_options(f"{handler_cls.subtype}/{cfgstring}")
        handler_cls.parse_config(handler_cfg)
    except ConfigError as e:
        return False, str(e)
    except Exception as e:  # a bug in parse_config must not kill the D-Bus service  # noqa: BLE001 - a plugin's failure is reported, never fatal
        log.error("%s: parse_config raised %s: %s", handler_cls.subtype, type(e).__name__, e)
        return False, f"{handler_cls.subtype}: parse_config failed: {type(e).__name__}: {e}"
    return True, "success"


# ---- config-string parsing -----------------------------------------------------------


def opt_int(lo: int, hi: int) -> Callable[[str], int]:
    """A converter for :func:`parse_options`: a decimal integer in ``[lo, hi]``."""

    def convert(text: str) -> int:
        if not text.isdecimal():
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"must be from {lo} to {hi}")
        return value

    return convert


_TRUE = frozenset({"1", "yes", "true", "on"})
_FALSE = frozenset({"0", "no", "false", "off"})


def opt_bool(text: str) -> bool:
    """A converter for :func:`parse_options`: 1/0, yes/no, true/false, on/off."""
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError("expected 1 or 0")


def parse_options(
    cfgstring: str, spec: Mapping[str, Callable[[str], Any]]
) -> tuple[str, dict[str, Any]]:
    """Split ``main;key=value;...`` into the main part and converted options.

    This is the option syntax tcmu-runner's handlers use (rbd's ``;osd_op_timeout=N``).
    Empty tokens are ignored; an unknown key, a token without ``=``, a repeated key or
    a value its converter refuses raises :class:`ConfigError` naming that token.
    """
    main, *tokens = cfgstring.split(";")
    opts: dict[str, Any] = {}
    for token in tokens:
        if not token:
            continue
        key, sep, value = token.partition("=")
        if key not in spec:
            known = ", ".join(f"{k}=" for k in spec) or "none"
            raise ConfigError(token, f"unknown option {key!r} (known options: {known})")
        if not sep:
            raise ConfigError(token, f"option {key!r} needs a value ({key}=...)")
        if key in opts:
            raise ConfigError(token, f"option {key!r} is given twice")
        try:
            opts[key] = spec[key](value)
        except ValueError as e:
            raise ConfigError(token, str(e)) from None
    return main, opts


#: Runner options tcmu-runner strips from the handler's config string (main.c
#: ``parse_tcmu_runner_args``, §2.13), with the converter for each value.
RUNNER_OPTIONS: Mapping[str, Callable[[str], Any]] = {
    "tcmur_cmd_time_out": opt_int(0, 2**31 - 1),
}


def split_runner_options(dev_config: str) -> tuple[str, str, dict[str, Any]]:
    """Split the kernel's ``dev_config`` into ``(subtype, handler_cfg, runner_opts)``.

    The subtype is the text before the first ``/``; the handler part is everything
    after it (so ``file//tmp/x`` gives ``/tmp/x``).  Like tcmu-runner's
    ``parse_tcmu_runner_args`` (main.c, §2.13), every ``;``-token of the handler part
    that starts with a runner option (``tcmur_cmd_time_out=``) is consumed and removed
    before the handler sees the string.  The documented place is the front, wrapped in
    semicolons::

        rbd/;tcmur_cmd_time_out=20;pool/rbd1;osd_op_timeout=30
            -> ("rbd", "pool/rbd1;osd_op_timeout=30", {"tcmur_cmd_time_out": 20})
        file/;tcmur_cmd_time_out=5;/path  -> ("file", "/path", {...: 5})

    Elsewhere, tcmu-runner also removes the ``;`` that follows the option and so glues
    its neighbours together (``a;tcmur_cmd_time_out=5;b`` -> ``ab``); that string can
    only have broken the handler, so here the neighbours keep one separator (``a;b``).
    A malformed value raises :class:`ConfigError` where tcmu-runner's ``atoi`` would
    silently read 0 (no timeout).
    """
    subtype, _, handler_cfg = dev_config.partition("/")
    if not subtype:
        raise ConfigError(dev_config, "no handler name before the first '/' (<subtype>/<cfg>)")
    if ";" not in handler_cfg:  # the common case, and no token can be an option
        return subtype, handler_cfg, {}
    head, *tokens = handler_cfg.split(";")
    runner_opts: dict[str, Any] = {}
    kept: list[str] = []
    prefix = head == ""  # ";opt=v;..." -- the options wrap the start of the handler part
    for token in tokens:
        key, sep, value = token.partition("=")
        if sep and key in RUNNER_OPTIONS:
            try:
                runner_opts[key] = RUNNER_OPTIONS[key](value)
            except ValueError as e:
                raise ConfigError(token, f"runner option {key}: {e}") from None
            continue
        if prefix and runner_opts and not kept:
            head = token  # first token after the prefix options is the handler's own start
            prefix = False
            continue
        prefix = False
        kept.append(token)
    if not runner_opts:
        return subtype, handler_cfg, {}
    if prefix:  # nothing followed the prefix options
        head = ""
    return subtype, ";".join([head, *kept]), runner_opts


# ---- errors at the handler boundary --------------------------------------------------

_HARDWARE_ERROR = (SenseKey.HARDWARE_ERROR, 0x44, 0x00)  # INTERNAL TARGET FAILURE


def exception_to_sense(exc: BaseException, handler: str, callback: str) -> SenseError:
    """Translate what a handler raised into the sense the command completes with.

    ``SenseError`` passes through; an ``OSError`` goes through the SCSI layer's errno
    table (the one place errno meets sense, style.md §3); anything else is a handler
    bug, logged here in one line naming ``handler`` and ``callback`` (the traceback
    only at debug level) and answered with HARDWARE ERROR.
    """
    if isinstance(exc, SenseError):
        return exc
    if isinstance(exc, OSError) and exc.errno is not None:
        # Looked up at call time: the SCSI layer is written in parallel with this module.
        scsi = importlib.import_module("tcmu_py.scsi")
        sense: SenseError = scsi.errno_to_sense(exc.errno)
        return sense
    log.error("handler %s: %s() raised %s: %s", handler, callback, type(exc).__name__, exc)
    log.debug("handler %s: %s() traceback", handler, callback, exc_info=exc)
    key, asc, ascq = _HARDWARE_ERROR
    return SenseError(key, asc, ascq, message=f"{handler}.{callback}: {type(exc).__name__}")
