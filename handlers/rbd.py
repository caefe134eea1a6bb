"""The ``rbd`` handler: a LIO ``user:rbd`` backstore on a Ceph RBD image, a drop-in for
tcmu-runner's (reference/tcmu.md §2.13).

Config string, as tcmu-runner and ceph-iscsi write it: ``rbd/pool/image`` followed by
optional ``;osd_op_timeout=N`` (seconds), ``;conf=/etc/ceph/x.conf`` and ``;id=user``.
Each device gets its own cluster connection, like tcmu-runner's.  The data path is
librbd's aio API reached through cffi (``_librbd``): reads and writes go straight
between the ring's memory and librbd, completions come back through an eventfd that
the loop thread polls.

What the initiator sees, and why:

* write cache off and FUA native: ``rbd_cache`` is off, so a write completes only when
  the OSDs have it on stable storage;
* UNMAP deallocates and reads back zeroes (LBPRZ): it is ``rbd_aio_write_zeroes``,
  which frees whole objects and zeroes partial ones, where ``rbd_aio_discard`` would
  silently skip ranges below ``rbd_discard_granularity_bytes``;
* WRITE SAME and COMPARE AND WRITE run natively in librbd; librbd's compare-and-write
  takes exactly 512 bytes, so with larger blocks the runner emulates it under its
  per-device lock;
* a stuck cluster fails commands after ``osd_op_timeout`` (ETIMEDOUT: BUSY, so the
  initiator retries); a blocklisted client (ESHUTDOWN: NOT READY, 04h/0Bh) makes the
  runner close and reopen the device with a new connection; another client holding
  the exclusive lock explicitly (EROFS) fences this path without a reopen.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tcmu_py.handler import ConfigError, DeviceInfo, Handler
from tcmu_py.scsi._model import SenseError, SenseKey
from tcmu_py.scsi._sense import Status, fail

from . import _librbd
from ._librbd import AioImage, Cluster, RbdError

__all__ = ["CONNECT_TIMEOUT", "RbdConfig", "RbdHandler"]

log = logging.getLogger("tcmu_py.handlers.rbd")

#: Upper bound, in seconds, on connecting to the monitors and on each mon command.
#: librados' defaults are 300 s and forever; a conf file may set lower values.
CONNECT_TIMEOUT = 30.0
#: What tcmu-runner registers in the service map (``ceph -s``, the dashboard, gwcli).
SERVICE = "tcmu-runner"
_FEATURE_EXCLUSIVE_LOCK = 1 << 2  # rbd/features.h


@dataclass(frozen=True)
class RbdConfig:
    """A parsed config string; ``None`` means "as the cluster's conf says"."""

    pool: str
    image: str
    osd_op_timeout: float | None = None
    conf: str | None = None
    user: str = "admin"

    @property
    def spec(self) -> str:
        return f"{self.pool}/{self.image}"


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not 0 < value < 1e6:
        raise ValueError("must be a positive number of seconds")
    return value


class RbdHandler(Handler):
    """Serve a device from an RBD image of exactly the device's size."""

    subtype = "rbd"
    cfg_desc = (
        "RBD config string is of the form:\n"
        "poolname/devicename[;option1;option2;...]\n"
        "where:\n"
        "poolname:\tExisting RADOS pool\n"
        "devicename:\tName of the RBD image (its size must equal the device's)\n"
        'optionN:\tLike: "osd_op_timeout=30" in secs\n'
        '                     "conf=/etc/ceph/cluster.conf"\n'
        '                     "id=user"\n'
    )
    thread_model = "async"
    native_fua = True  # rbd_cache=false: every write is on the OSDs' stable storage
    lbprz = True  # UNMAP is write_zeroes
    write_cache = False
    solid_state = False

    def __init__(self) -> None:
        super().__init__()
        #: tcmu-runner's service status counters; they survive reopens
        self.counters = {"lock_lost_cnt": 0, "conn_lost_cnt": 0, "cmd_timed_out_cnt": 0}
        self._cluster: Cluster | None = None
        self._ioctx: Any = None
        self._img: AioImage | None = None
        # guards the cluster and image handles against a status push racing a close
        self._ctl = threading.RLock()
        self._old_addrs: list[str] = []
        self._lost_lock = False
        self._status_pending = False
        self._owner_reported = False
        self.osd_op_timeout = 0.0

    # ---- configuration --------------------------------------------------------------

    @classmethod
    def parse_config(cls, cfgstring: str) -> RbdConfig:
        # Pure (D-Bus CheckConfig): no library, no file, no network.  Like tcmu-runner's
        # strtok, leading slashes are skipped, so "rbd//pool/image" works too.
        head, *tokens = cfgstring.lstrip("/").split(";")
        pool, sep, image = head.partition("/")
        if not pool or not sep:
            raise ConfigError(head or cfgstring, "expected pool/image (rbd/<pool>/<image>)")
        if not image:
            raise ConfigError(head, f"no image name after the pool {pool!r} (pool/image)")
        if "/" in image:
            raise ConfigError(head, "the image name may not contain '/' (RBD namespaces "
                                    "are not supported in the config string)")
        opts: dict[str, Any] = {}
        for token in tokens:
            if not token:
                continue
            key, eq, value = token.partition("=")
            if key not in ("osd_op_timeout", "conf", "id"):
                raise ConfigError(token, f"unknown option {key!r} "
                                         "(known: osd_op_timeout=, conf=, id=)")
            if not eq or not value:
                raise ConfigError(token, f"option {key!r} needs a value ({key}=...)")
            if key in opts:
                raise ConfigError(token, f"option {key!r} is given twice")
            if key == "osd_op_timeout":
                try:
                    opts[key] = _timeout(value)
                except ValueError as e:
                    raise ConfigError(token, str(e)) from None
            elif key == "conf":
                if not value.startswith("/"):
                    raise ConfigError(token, "conf= must be an absolute path")
                opts["conf"] = value
            else:
                user = value.removeprefix("client.")  # librados adds "client." itself
                if not user or any(c.isspace() for c in user):
                    raise ConfigError(token, "id= must be a Ceph user name such as 'iscsi'")
                opts["user"] = user
        return RbdConfig(pool, image, **opts)

    # ---- lifecycle ------------------------------------------------------------------

    def open(self, dev: DeviceInfo, reopen: bool) -> None:
        self.dev = dev
        cfg = dev.config
        if not isinstance(cfg, RbdConfig):
            cfg = dev.config = self.parse_config(dev.cfgstring)
        cluster = Cluster(cfg.user)
        ioctx = img = None
        try:
            self._configure(cluster, cfg)
            self._connect(cluster, cfg)
            try:
                ioctx = cluster.ioctx(cfg.pool)
            except RbdError as e:
                if e.errno == errno.ENOENT:
                    raise RbdError(e.errno, f"pool {cfg.pool!r} does not exist") from None
                raise RbdError(e.errno, f"cannot open pool {cfg.pool!r}: {e}") from None
            try:
                img = AioImage(cluster, ioctx, cfg.image)
            except RbdError as e:
                if e.errno == errno.ENOENT:
                    raise RbdError(e.errno, f"image {cfg.image!r} does not exist in pool "
                                            f"{cfg.pool!r}") from None
                raise RbdError(e.errno, f"cannot open image {cfg.spec}: {e}") from None
            size = img.size()
            if size != dev.size:
                raise RbdError(errno.EINVAL, f"image {cfg.spec} is {size} bytes but the device "
                               f"is {dev.size} bytes: they must be equal (rbd resize, or "
                               "recreate the backstore with the image's size)")
            img.error_for = self._error_for
            self._inspect(cluster, img, cfg)
        except BaseException:
            if img is not None:
                img.close(0)
            if ioctx is not None:
                cluster.destroy_ioctx(ioctx)
            cluster.shutdown()
            raise
        with self._ctl:
            self._cluster, self._ioctx, self._img = cluster, ioctx, img
        self._lost_lock = False
        self._owner_reported = False
        self._register(cluster, img, cfg)
        if self._old_addrs:
            self._unblocklist(cluster, self._old_addrs)
        try:
            self._old_addrs = [cluster.addrs()]
        except OSError:
            self._old_addrs = []
        log.info("%s: rbd image %s open (%d bytes, osd_op_timeout %g s%s)", dev.name, cfg.spec,
                 size, self.osd_op_timeout, ", reopened" if reopen else "")

    def _configure(self, cluster: Cluster, cfg: RbdConfig) -> None:
        rc = cluster.read_conf(cfg.conf)
        if cfg.conf and rc < 0:
            raise RbdError(-rc, f"cannot read the Ceph config {cfg.conf}: {os.strerror(-rc)}")
        cluster.conf_set("rbd_cache", "false")  # as tcmu-runner: WCE off, FUA native
        # librbd copies write data before sending it (rbd_disable_zero_copy_writes, the
        # default).  Its zero-copy mode would save that copy (bench/rbd_aio.py), but in
        # 16.2 a zero-copy write that fails before reaching an OSD (blocklisted, lock
        # lost) never completes: its buffer reference is not dropped, so the completion
        # stays blocked.  Force the default in case a conf changes it.
        cluster.conf_set("rbd_disable_zero_copy_writes", "true")
        # Bounded connect and mon commands, unless the conf already asks for less.
        for key in ("client_mount_timeout", "rados_mon_op_timeout"):
            current = float(cluster.conf_get(key) or 0)
            if current <= 0 or current > CONNECT_TIMEOUT:
                cluster.conf_set(key, f"{CONNECT_TIMEOUT:g}")
        # After an OSD restart the objecter may wait one tick before resending (5 s).
        if float(cluster.conf_get("objecter_tick_interval") or 0) > 1:
            cluster.conf_set("objecter_tick_interval", "1")
        # tcmu-runner's rule (rbd.c timer_check_and_set_def): the op timeout must exceed
        # the time the cluster needs to mark a dead OSD down, or a failover to another
        # OSD would be reported as a failed command.
        grace = int(float(cluster.conf_get("osd_heartbeat_grace")))
        interval = int(float(cluster.conf_get("osd_heartbeat_interval")))
        default = float(cluster.conf_get("rados_osd_op_timeout") or 0)
        floor = grace + interval
        if cfg.osd_op_timeout is not None and cfg.osd_op_timeout > floor:
            timeout = cfg.osd_op_timeout
        elif default > floor:
            timeout = default
        else:
            timeout = float(floor + 5)
            if cfg.osd_op_timeout is not None:
                log.warning("%s: osd_op_timeout=%g must exceed osd_heartbeat_grace (%d) + "
                            "osd_heartbeat_interval (%d); using %g s", cfg.spec,
                            cfg.osd_op_timeout, grace, interval, timeout)
        cluster.conf_set("rados_osd_op_timeout", f"{timeout:g}")
        self.osd_op_timeout = timeout

    def _connect(self, cluster: Cluster, cfg: RbdConfig) -> None:
        try:
            cluster.connect()
        except RbdError as e:
            mons = cluster.conf_get("mon_host") or "none configured"
            where = f"conf {cfg.conf}" if cfg.conf else "the default ceph.conf"
            if e.errno == errno.ETIMEDOUT:
                wait = float(cluster.conf_get("client_mount_timeout"))
                msg = (f"no answer from the Ceph monitors ({mons}, {where}) within {wait:g} s: "
                       "is the cluster running and reachable?")
            elif e.errno in (errno.EACCES, errno.EPERM):
                msg = (f"the Ceph monitors refused client.{cfg.user}: unknown user or wrong key "
                       f"(keyring {cluster.conf_get('keyring')})")
            elif e.errno == errno.ENOENT:
                msg = f"no Ceph monitors to connect to (mon_host: {mons}, {where}): give conf=PATH"
            else:
                msg = f"cannot connect to the Ceph cluster ({mons}) as client.{cfg.user}: {e}"
            raise RbdError(e.errno, msg) from None

    def _inspect(self, cluster: Cluster, img: AioImage, cfg: RbdConfig) -> None:
        """What the SCSI layer advertises besides the size (tcmu-runner's open does the same)."""
        bs = self.dev.block_size
        obj = img.object_size()
        # librbd splits and aligns large requests itself; tcmu-runner caps one UNMAP and
        # one XCOPY chunk at four objects to keep the OSD queues fair.
        self.max_unmap_lbas = 4 * obj // bs
        self.unmap_granularity = max(1, int(cluster.conf_get("rbd_discard_granularity_bytes")) // bs)
        if not img.features() & _FEATURE_EXCLUSIVE_LOCK:
            log.warning("%s: exclusive-lock is not enabled on the image: multipath HA "
                        "is not supported", cfg.spec)
        self.solid_state = _solid_state(cluster, cfg.pool)

    def close(self) -> None:
        with self._ctl:
            img, ioctx, cluster = self._img, self._ioctx, self._cluster
            self._cluster = self._ioctx = None
            if img is not None:
                # in-flight ops finish or fail within the op timeout
                img.close(wait=self.osd_op_timeout + 5)
            if cluster is not None:
                if ioctx is not None:
                    cluster.destroy_ioctx(ioctx)
                cluster.shutdown()

    # ---- the data path (loop thread) -------------------------------------------------

    def read(self, offset: int, length: int, bufs: Sequence[memoryview]) -> asyncio.Future[Any]:
        return self._image().read(offset, length, bufs)

    def write(self, offset: int, length: int, bufs: Sequence[memoryview], fua: bool
              ) -> asyncio.Future[Any]:
        fut = self._image().write(offset, length, bufs)
        if not self._owner_reported:
            self._owner_reported = True
            fut.add_done_callback(lambda _f: self._schedule_status())  # lock_owner is now true
        return fut

    def flush(self) -> asyncio.Future[Any]:
        return self._image().flush()

    def unmap(self, offset: int, length: int) -> asyncio.Future[Any]:
        return self._image().write_zeroes(offset, length)

    def write_same(self, offset: int, length: int, pattern: bytes, unmap: bool
                   ) -> asyncio.Future[Any]:
        if not any(pattern):
            return self._image().write_zeroes(offset, length)
        return self._image().writesame(offset, length, pattern)

    def can_compare_and_write(self) -> bool:
        return self.dev.block_size == 512  # librbd: exactly 512 bytes, 512-aligned

    def compare_and_write(self, offset: int, compare: bytes, write: bytes) -> asyncio.Future[Any]:
        return self._image().compare_and_write(offset, compare, write)

    def _image(self) -> AioImage:
        img = self._img
        if img is None:
            raise OSError(errno.ESHUTDOWN, "the rbd image is not open")
        return img

    def _error_for(self, rv: int, miscompare_at: int | None) -> BaseException:
        """The exception a failed librbd completion raises (loop thread)."""
        err = -rv
        log.debug("%s: librbd op failed: %s", self.dev.name, errno.errorcode.get(err, err))
        if miscompare_at is not None:
            return SenseError(SenseKey.MISCOMPARE, 0x1D, 0x00, info=miscompare_at)
        if err == errno.ESHUTDOWN:  # blocklisted: the engine reopens with a new client
            self._lock_lost()
            return OSError(err, "this client was blocklisted by the cluster (lock taken over)")
        if err == errno.EROFS:  # another client holds the exclusive lock explicitly
            self._lock_lost()
            return fail(Status.FENCED, message="another client holds the image's exclusive lock")
        if err == errno.ETIMEDOUT:
            self.counters["cmd_timed_out_cnt"] += 1
            self._schedule_status()
        return OSError(err, os.strerror(err))

    def _lock_lost(self) -> None:
        if not self._lost_lock:
            self._lost_lock = True
            self.counters["lock_lost_cnt"] += 1
            self._schedule_status()

    # ---- live changes ------------------------------------------------------------------

    def reconfig(self, what: str, value: Any) -> None:
        if what == "size":
            img = self._image()
            current = img.size()
            if value > current:  # grow the image; ceph-iscsi grows it first, then LIO
                img.resize(value)
            elif value < current:
                raise OSError(errno.EINVAL, f"the image is {current} bytes; shrinking the device "
                              f"to {value} would hide data (shrink the image first)")
            self.dev.num_lbas = value // self.dev.block_size  # a reopen checks the size
        elif what == "write_cache":
            if value:
                raise OSError(errno.EOPNOTSUPP, "rbd devices run with the write cache off")
        elif what != "cfgstring" or value != self.dev.cfgstring:
            raise OSError(errno.EOPNOTSUPP, f"the rbd handler cannot change {what} live")

    # ---- the cluster's view: service map and blocklist ------------------------------------

    def report_event(self, event: str) -> None:
        key = f"{event}_cnt"
        if key in self.counters:
            self.counters[key] += 1
        self._schedule_status()

    def status(self) -> dict[str, str]:
        """The status tcmu-runner publishes (rbd.c tcmu_rbd_service_status_update)."""
        with self._ctl:
            img = self._img if self._cluster is not None else None
            try:
                owner = img is not None and img.is_lock_owner()
            except OSError:
                owner = False
        return {"lock_owner": "true" if owner else "false",
                **{k: str(v) for k, v in self.counters.items()}}

    def _schedule_status(self) -> None:
        """Push the status from a worker thread (the lock query may block), coalesced.
        Outside the loop thread (a close reaping its last completions) nothing is pushed:
        the next open registers again with the current counters."""
        if self._status_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._status_pending = True
        loop.run_in_executor(None, self._push_status)

    def _push_status(self) -> None:
        self._status_pending = False
        status = self.status()
        with self._ctl:
            if self._cluster is None:
                return
            try:
                self._cluster.service_update_status(status)
            except OSError as e:
                log.debug("service status update failed: %s", e)

    def _register(self, cluster: Cluster, img: AioImage, cfg: RbdConfig) -> None:
        daemon = f"{os.uname().nodename}:{cfg.spec}"
        try:
            meta = {"pool_name": cfg.pool, "image_name": cfg.image, "image_id": img.image_id()}
            cluster.service_register(SERVICE, daemon, meta)
        except OSError as e:  # tcmu-runner refuses the device here; the map is cosmetic
            log.warning("%s: cannot register %s in the Ceph service map: %s", cfg.spec, daemon, e)
            return
        self._push_status()

    def _unblocklist(self, cluster: Cluster, addrs: list[str]) -> None:
        """Remove this handler's former addresses from the blocklist (rbd.c does the same
        for the entries its earlier connections left): they can never connect again, and
        every entry costs the cluster an osdmap change."""
        for entry in addrs:
            for addr in entry.strip("[]").split(","):
                addr = addr.strip().removeprefix("v1:").removeprefix("v2:")
                if not addr:
                    continue
                for prefix, op in (("osd blocklist", "blocklistop"), ("osd blacklist", "blacklistop")):
                    rc, _out, _st = cluster.mon_command({"prefix": prefix, op: "rm", "addr": addr})
                    if rc != -errno.EINVAL:  # EINVAL: a release without that spelling
                        break
                log.debug("blocklist rm %s: %s", addr, os.strerror(-rc) if rc < 0 else "ok")


def _solid_state(cluster: Cluster, pool: str) -> bool:
    """Whether the pool's CRUSH rule is limited to ssd or nvme OSDs (tcmu-runner reports
    non-rotating media then).  Best effort: any failure means rotating."""
    try:
        rc, out, _ = cluster.mon_command(
            {"prefix": "osd pool get", "pool": pool, "var": "crush_rule", "format": "json"})
        if rc < 0:
            return False
        rule = json.loads(out)["crush_rule"]
        for cls in ("ssd", "nvme"):
            rc, out, _ = cluster.mon_command(
                {"prefix": "osd crush rule ls-by-class", "class": cls, "format": "json"})
            if rc == 0 and rule in json.loads(out):
                return True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return False


def librbd_available() -> bool:
    """Whether this host can serve rbd devices (librbd and librados load)."""
    return _librbd.available()
