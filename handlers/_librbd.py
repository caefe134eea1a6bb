"""A cffi (ABI mode) binding of ``librados.so.2`` and ``librbd.so.1`` for the rbd handler.

Why not python-rbd: its 16.2 release lacks ``rbd_aio_writesame``,
``rbd_aio_compare_and_write`` and the vectored ``rbd_aio_readv``/``rbd_aio_writev``, its
``aio_write`` wants ``bytes`` (a copy of the ring's data) and its ``aio_read`` hands back a
new ``bytes`` (another copy), and it runs a Python callback in a librbd thread for every
completion.  ``bench/rbd_aio.py`` measures the difference.  It also cannot share its
cluster handle, so the handler talks to librados through this module only.

Completions use librbd's event socket (``rbd_set_image_notification`` with an eventfd,
then ``rbd_poll_io_events``): librbd's threads never enter Python; the loop thread reads
the eventfd and resolves the futures itself, in batches.  The library is loaded on
first use, so importing the handler (and D-Bus ``CheckConfig``) works without librbd.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import os
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["AioImage", "Cluster", "RbdError", "available"]

_CDEF = """
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);
struct iovec { void *iov_base; size_t iov_len; };
typedef struct {
  uint64_t size;
  uint64_t obj_size;
  uint64_t num_objs;
  int order;
  char block_name_prefix[24];
  int64_t parent_pool;
  char parent_name[96];
} rbd_image_info_t;

int rados_create2(rados_t *pcluster, const char *const clustername,
                  const char * const name, uint64_t flags);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_conf_get(rados_t cluster, const char *option, char *buf, size_t len);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
int rados_mon_command(rados_t cluster, const char **cmd, size_t cmdlen,
                      const char *inbuf, size_t inbuflen, char **outbuf,
                      size_t *outbuflen, char **outs, size_t *outslen);
void rados_buffer_free(char *buf);
int rados_getaddrs(rados_t cluster, char **addrs);
int rados_service_register(rados_t cluster, const char *service, const char *daemon,
                           const char *metadata_dict);
int rados_service_update_status(rados_t cluster, const char *status_dict);

int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int rbd_close(rbd_image_t image);
int rbd_get_size(rbd_image_t image, uint64_t *size);
int rbd_resize(rbd_image_t image, uint64_t size);
int rbd_stat(rbd_image_t image, rbd_image_info_t *info, size_t infosize);
int rbd_get_id(rbd_image_t image, char *id, size_t id_len);
int rbd_get_features(rbd_image_t image, uint64_t *features);
int rbd_is_exclusive_lock_owner(rbd_image_t image, int *is_owner);
int rbd_set_image_notification(rbd_image_t image, int fd, int type);
int rbd_poll_io_events(rbd_image_t image, rbd_completion_t *comps, int numcomp);

int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c);
ssize_t rbd_aio_get_return_value(rbd_completion_t c);
void *rbd_aio_get_arg(rbd_completion_t c);
void rbd_aio_release(rbd_completion_t c);
int rbd_aio_read(rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c);
int rbd_aio_readv(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                  rbd_completion_t c);
int rbd_aio_write(rbd_image_t image, uint64_t off, size_t len, const char *buf,
                  rbd_completion_t c);
int rbd_aio_writev(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                   rbd_completion_t c);
int rbd_aio_flush(rbd_image_t image, rbd_completion_t c);
int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c);
int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                         int zero_flags, int op_flags);
int rbd_aio_writesame(rbd_image_t image, uint64_t off, size_t len, const char *buf,
                      size_t data_len, rbd_completion_t c, int op_flags);
ssize_t rbd_aio_compare_and_write(rbd_image_t image, uint64_t off, size_t len,
                                  const char *cmp_buf, const char *buf, rbd_completion_t c,
                                  uint64_t *mismatch_off, int op_flags);
"""

_EVENT_TYPE_EVENTFD = 2  # librbd.h
_IOV_MAX = 1024  # librbd refuses larger vectors (-EINVAL)
_POLL_BATCH = 64
_lib_lock = threading.Lock()
_lib: tuple[Any, Any, Any] | None = None


class RbdError(OSError):
    """An errno plus one line saying what failed and what to do; ``str()`` is that line."""

    def __str__(self) -> str:
        return str(self.strerror)


def _load() -> tuple[Any, Any, Any]:
    """(ffi, librados, librbd), loaded once; RbdError(ENOENT) if the libraries are missing."""
    global _lib
    if _lib is None:
        with _lib_lock:
            if _lib is None:
                import cffi

                ffi = cffi.FFI()
                ffi.cdef(_CDEF)
                try:
                    rados, rbd = ffi.dlopen("librados.so.2"), ffi.dlopen("librbd.so.1")
                except OSError as e:
                    raise RbdError(
                        errno.ENOENT,
                        f"cannot load librbd/librados ({e}); install the librbd1 package",
                    ) from None
                _lib = (ffi, rados, rbd)
    return _lib


def available() -> bool:
    """Whether librbd and librados can be loaded on this host."""
    try:
        _load()
    except OSError:
        return False
    return True


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise RbdError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def _dict_str(d: Mapping[str, str]) -> bytes:
    """librados' "key\\0value\\0...\\0" encoding of a string map (service metadata)."""
    return b"".join(k.encode() + b"\0" + str(v).encode() + b"\0" for k, v in d.items()) + b"\0"


class Cluster:
    """One librados connection (``rados_t``), configured but not yet connected."""

    def __init__(self, user: str) -> None:
        self.ffi, self.rados, self.rbd = _load()
        handle = self.ffi.new("rados_t *")
        _check(self.rados.rados_create2(handle, b"ceph", f"client.{user}".encode(), 0),
               f"cannot create a Ceph client for client.{user}")
        self.handle = handle[0]
        self.user = user

    def read_conf(self, path: str | None) -> int:
        """Read a ceph.conf; ``None`` searches the default places.  Returns librados' rc."""
        return int(self.rados.rados_conf_read_file(
            self.handle, path.encode() if path else self.ffi.NULL))

    def conf_get(self, key: str) -> str:
        buf = self.ffi.new("char[]", 256)
        _check(self.rados.rados_conf_get(self.handle, key.encode(), buf, 256), f"conf_get {key}")
        return str(self.ffi.string(buf).decode())

    def conf_set(self, key: str, value: str) -> None:
        _check(self.rados.rados_conf_set(self.handle, key.encode(), value.encode()),
               f"cannot set {key}={value}")

    def connect(self) -> None:
        """Connect (blocks up to ``client_mount_timeout``); raises RbdError with the rc."""
        ret = self.rados.rados_connect(self.handle)
        if ret < 0:
            raise RbdError(-ret, os.strerror(-ret))

    def ioctx(self, pool: str) -> Any:
        io = self.ffi.new("rados_ioctx_t *")
        ret = self.rados.rados_ioctx_create(self.handle, pool.encode(), io)
        if ret < 0:
            raise RbdError(-ret, os.strerror(-ret))
        return io[0]

    def mon_command(self, cmd: Mapping[str, Any]) -> tuple[int, bytes, str]:
        """One mon command (bounded by ``rados_mon_op_timeout``): (rc, output, status)."""
        ffi = self.ffi
        text = ffi.new("char[]", json.dumps(cmd).encode())
        cmds = ffi.new("const char *[1]", [text])
        out, outlen = ffi.new("char **"), ffi.new("size_t *")
        st, stlen = ffi.new("char **"), ffi.new("size_t *")
        ret = self.rados.rados_mon_command(self.handle, cmds, 1, ffi.NULL, 0, out, outlen, st, stlen)
        data = ffi.unpack(out[0], outlen[0]) if out[0] != ffi.NULL else b""
        status = ffi.unpack(st[0], stlen[0]).decode(errors="replace") if st[0] != ffi.NULL else ""
        for p in (out[0], st[0]):
            if p != ffi.NULL:
                self.rados.rados_buffer_free(p)
        return int(ret), bytes(data), status

    def addrs(self) -> str:
        """This client's addresses, as the blocklist names them."""
        p = self.ffi.new("char **")
        _check(self.rados.rados_getaddrs(self.handle, p), "rados_getaddrs")
        try:
            return str(self.ffi.string(p[0]).decode())
        finally:
            self.rados.rados_buffer_free(p[0])

    def service_register(self, service: str, daemon: str, metadata: Mapping[str, str]) -> None:
        _check(self.rados.rados_service_register(
            self.handle, service.encode(), daemon.encode(), _dict_str(metadata)),
            "service registration")

    def service_update_status(self, status: Mapping[str, str]) -> None:
        _check(self.rados.rados_service_update_status(self.handle, _dict_str(status)),
               "service status update")

    def destroy_ioctx(self, io: Any) -> None:
        self.rados.rados_ioctx_destroy(io)

    def shutdown(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            self.rados.rados_shutdown(handle)


# What a completion means: its kind decides how the return value is turned into a result.
_PLAIN, _CAW = 0, 1


class AioImage:
    """An open image, its synchronous control calls, and its asynchronous data path.

    The async methods must be called in the event-loop thread and return an
    ``asyncio.Future`` that the same thread resolves: the first call registers the
    image's eventfd with the running loop.  Buffers passed in must stay valid until the
    future is done (the ring's memory does); this object keeps the cffi views alive.
    """

    def __init__(self, cluster: Cluster, ioctx: Any, name: str) -> None:
        ffi, rbd = cluster.ffi, cluster.rbd
        self.ffi, self.rbd = ffi, rbd
        img = ffi.new("rbd_image_t *")
        ret = rbd.rbd_open(ioctx, name.encode(), img, ffi.NULL)
        if ret < 0:
            raise RbdError(-ret, os.strerror(-ret))
        self.handle = img[0]
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            _check(rbd.rbd_set_image_notification(self.handle, self._efd, _EVENT_TYPE_EVENTFD),
                   "rbd_set_image_notification")
        except BaseException:
            os.close(self._efd)
            rbd.rbd_close(self.handle)
            raise
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[Any, tuple[asyncio.Future[Any], int, Any]] = {}
        self._null = ffi.NULL
        self._cp = ffi.new("rbd_completion_t *")  # scratch: read right after each create
        self._comps = ffi.new("rbd_completion_t[]", _POLL_BATCH)
        self._closed = False
        # completions made with a callback (see compare_and_write): librbd's thread queues
        # them here and wakes the loop through the same eventfd
        self._callbacks: collections.deque[Any] = collections.deque()
        self._callback = ffi.callback("void(rbd_completion_t, void *)", self._called_back)
        #: turns a failed completion into the exception its future gets: called with the
        #: negative errno and, for COMPARE AND WRITE's -EILSEQ, the offset of the first
        #: differing byte (else None); runs in the thread that reaps (normally the loop's)
        self.error_for: Callable[[int, int | None], BaseException] = _default_error

    # ---- control (blocking; never from the loop thread while I/O is pending) --------
    def size(self) -> int:
        n = self.ffi.new("uint64_t *")
        _check(self.rbd.rbd_get_size(self.handle, n), "rbd_get_size")
        return int(n[0])

    def resize(self, size: int) -> None:
        _check(self.rbd.rbd_resize(self.handle, size), f"cannot resize the image to {size} bytes")

    def object_size(self) -> int:
        info = self.ffi.new("rbd_image_info_t *")
        _check(self.rbd.rbd_stat(self.handle, info, self.ffi.sizeof("rbd_image_info_t")), "rbd_stat")
        return int(info.obj_size)

    def image_id(self) -> str:
        buf = self.ffi.new("char[]", 64)
        _check(self.rbd.rbd_get_id(self.handle, buf, 64), "rbd_get_id")
        return str(self.ffi.string(buf).decode())

    def features(self) -> int:
        n = self.ffi.new("uint64_t *")
        _check(self.rbd.rbd_get_features(self.handle, n), "rbd_get_features")
        return int(n[0])

    def is_lock_owner(self) -> bool:
        owner = self.ffi.new("int *")
        _check(self.rbd.rbd_is_exclusive_lock_owner(self.handle, owner), "lock owner")
        return bool(owner[0])

    # ---- the data path (loop thread) -------------------------------------------------
    def read(self, offset: int, length: int, bufs: Sequence[Any]) -> asyncio.Future[Any]:
        ffi = self.ffi
        if len(bufs) == 1:
            view = ffi.from_buffer(bufs[0], require_writable=True)
            return self._start(self.rbd.rbd_aio_read, (self.handle, offset, length, view), view)
        iov, keep = self._iovec(bufs, length, writable=True)
        if iov is None:  # too many pieces for librbd: read into one buffer, then scatter
            return self._bounce_read(offset, length, bufs)
        return self._start(self.rbd.rbd_aio_readv, (self.handle, iov, len(keep), offset), (iov, keep))

    def write(self, offset: int, length: int, bufs: Sequence[Any]) -> asyncio.Future[Any]:
        ffi = self.ffi
        if len(bufs) == 1:
            view = ffi.from_buffer(bufs[0])
            return self._start(self.rbd.rbd_aio_write, (self.handle, offset, length, view), view)
        iov, keep = self._iovec(bufs, length, writable=False)
        if iov is None:
            view = ffi.from_buffer(b"".join(bufs)[:length])
            return self._start(self.rbd.rbd_aio_write, (self.handle, offset, length, view), view)
        return self._start(self.rbd.rbd_aio_writev, (self.handle, iov, len(keep), offset), (iov, keep))

    def flush(self) -> asyncio.Future[Any]:
        return self._start(self.rbd.rbd_aio_flush, (self.handle,), None)

    def discard(self, offset: int, length: int) -> asyncio.Future[Any]:
        return self._start(self.rbd.rbd_aio_discard, (self.handle, offset, length), None)

    def write_zeroes(self, offset: int, length: int) -> asyncio.Future[Any]:
        # zero_flags 0: deallocate whole objects, zero partial ones -- unlike discard,
        # which skips pieces smaller than rbd_discard_granularity_bytes
        return self._start(self.rbd.rbd_aio_write_zeroes, (self.handle, offset, length), None,
                           tail=(0, 0))

    def writesame(self, offset: int, length: int, pattern: bytes) -> asyncio.Future[Any]:
        view = self.ffi.from_buffer(pattern)
        return self._start(self.rbd.rbd_aio_writesame,
                           (self.handle, offset, length, view, len(pattern)), view, tail=(0,))

    def compare_and_write(self, offset: int, compare: bytes, data: bytes) -> asyncio.Future[Any]:
        ffi = self.ffi
        cmp_view, data_view = ffi.from_buffer(compare), ffi.from_buffer(data)
        mismatch = ffi.new("uint64_t *")
        return self._start(
            self.rbd.rbd_aio_compare_and_write,
            (self.handle, offset, len(compare), cmp_view, data_view),
            (cmp_view, data_view, mismatch, offset),
            tail=(mismatch, 0),
            kind=_CAW,
            callback=True,  # librbd 16.2 does not signal the event socket for this one
        )

    def _iovec(self, bufs: Sequence[Any], length: int, writable: bool) -> tuple[Any, list[Any]]:
        """A ``struct iovec[]`` over ``bufs`` clipped to ``length`` bytes, and the cffi views
        it points into (to keep alive); ``(None, [])`` if librbd would refuse that many."""
        ffi = self.ffi
        parts = []
        for b in bufs:
            if length <= 0:
                break
            n = min(len(b), length)
            parts.append((ffi.from_buffer(b, require_writable=writable), n))
            length -= n
        if len(parts) > _IOV_MAX:
            return None, []
        iov = ffi.new("struct iovec[]", len(parts))
        for i, (view, n) in enumerate(parts):
            iov[i].iov_base = view
            iov[i].iov_len = n
        return iov, parts

    def _bounce_read(self, offset: int, length: int, bufs: Sequence[Any]) -> asyncio.Future[Any]:
        buf = bytearray(length)
        inner = self.read(offset, length, [memoryview(buf)])
        outer: asyncio.Future[Any] = inner.get_loop().create_future()

        def _scatter(f: asyncio.Future[Any]) -> None:
            if f.exception() is not None:
                outer.set_exception(f.exception())  # type: ignore[arg-type]
                return
            pos = 0
            for b in bufs:
                n = min(len(b), length - pos)
                b[:n] = buf[pos : pos + n]
                pos += n
            outer.set_result(None)

        inner.add_done_callback(_scatter)
        return outer

    def _start(self, fn: Any, args: tuple[Any, ...], keep: Any, tail: tuple[Any, ...] = (),
               kind: int = _PLAIN, callback: bool = False) -> asyncio.Future[Any]:
        """Create a completion, start ``fn(*args, completion, *tail)``, return its future.

        Completions are keyed by their pointer (cffi pointers hash by address), so no
        argument travels through librbd and nothing is cast on the hot path.  With
        ``callback`` librbd calls :meth:`_called_back` instead of using the event socket.
        """
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "the rbd image is closed")
        loop = self._loop or self._attach()
        fut = loop.create_future()
        rbd, cp = self.rbd, self._cp
        rbd.rbd_aio_create_completion(self._null, self._callback if callback else self._null, cp)
        comp = cp[0]
        self._pending[comp] = (fut, kind, keep)
        ret = fn(*args, comp, *tail)
        if ret < 0:
            del self._pending[comp]
            rbd.rbd_aio_release(comp)
            raise OSError(-ret, os.strerror(-ret))
        return fut

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._efd, self._reap_in_loop)
        self._loop = loop
        return loop

    def _called_back(self, comp: Any, _arg: Any) -> None:
        """librbd's thread, holding the GIL only for this: queue, then wake the loop."""
        self._callbacks.append(comp)
        with contextlib.suppress(OSError):
            os.eventfd_write(self._efd, 1)

    def _reap_in_loop(self) -> None:
        _settle(self._reap())

    def _reap(self) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        """Collect finished completions: (future, ok, result or exception) each.  Any thread."""
        if self.handle is None:
            return []
        try:  # noqa: SIM105 - the hot path: no context manager per batch
            os.eventfd_read(self._efd)  # reset first: a later completion notifies again
        except BlockingIOError:
            pass
        rbd, comps, pending = self.rbd, self._comps, self._pending
        done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        extra = self._callbacks
        while True:
            n = rbd.rbd_poll_io_events(self.handle, comps, _POLL_BATCH)
            finished = [comps[i] for i in range(n)]
            while extra:
                finished.append(extra.popleft())
            for c in finished:
                rv = rbd.rbd_aio_get_return_value(c)
                rbd.rbd_aio_release(c)  # the pointer stays a valid dict key
                entry = pending.pop(c, None)
                if entry is None:
                    continue
                fut, kind, keep = entry
                if rv >= 0:
                    done.append((fut, True, None))
                    continue
                where = None
                if kind == _CAW and rv == -errno.EILSEQ:
                    _cmp, _data, mismatch, offset = keep
                    where = int(mismatch[0])  # librbd 16.2: relative to the compared data
                    if where >= len(_cmp):  # a librbd that reports the image offset
                        where -= offset
                done.append((fut, False, self.error_for(rv, where)))
            if n < _POLL_BATCH:
                return done

    # ---- closing (any thread) -----------------------------------------------------------
    def close(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for in-flight I/O, close the image, and fail what
        is still pending (the engine has answered those commands already).

        Any thread.  The loop stops watching the eventfd first, so from then on only
        this thread touches the completions and the loop never waits for a close.
        """
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        in_loop = loop is not None and _running_loop() is loop
        if loop is not None and not loop.is_closed():
            if in_loop or not loop.is_running():
                loop.remove_reader(self._efd)
            else:
                removed = threading.Event()

                def _unwatch() -> None:
                    loop.remove_reader(self._efd)
                    removed.set()

                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_unwatch)
                    removed.wait(5)
        deadline = time.monotonic() + wait
        while self._pending:
            self._deliver(self._reap(), in_loop)
            left = deadline - time.monotonic()
            if not self._pending or left <= 0:
                break
            select.select([self._efd], [], [], min(left, 0.1))
        self.rbd.rbd_close(self.handle)
        self.handle = None
        os.close(self._efd)
        stale = [(f, False, OSError(errno.ESHUTDOWN, "the rbd image was closed"))
                 for f, _k, _keep in self._pending.values()]
        self._pending.clear()
        self._deliver(stale, in_loop)

    def _deliver(self, done: list[tuple[asyncio.Future[Any], bool, Any]], in_loop: bool) -> None:
        """Settle futures from any thread: directly in the loop thread, else through it."""
        loop = self._loop
        if not done:
            return
        if in_loop or loop is None:
            _settle(done)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(_settle, done)


def _settle(done: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in done:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


def _default_error(rv: int, miscompare_at: int | None) -> BaseException:
    if miscompare_at is not None:
        return OSError(errno.EILSEQ, f"miscompare at byte {miscompare_at}")
    return OSError(-rv, os.strerror(-rv))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
