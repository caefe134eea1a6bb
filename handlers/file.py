"""The ``file`` handler: a disk image in a regular file or on a block device.

This is the teaching example of the handler contract (``tcmu_py/handler.py``); read it
top to bottom.  It shows:

1. a pure ``parse_config`` for tcmu-runner's config string ``file//path/to/image``
   (the handler gets everything after the first ``/``) plus our options
   ``;threads=N``, ``;direct=1`` and ``;readonly=1``;
2. an ``open`` that checks the backing store against the device and probes what the
   filesystem can do, so that only true capabilities are reported (LBPRZ, UNMAP);
3. zero-copy I/O: ``os.preadv``/``os.pwritev`` read and write the ring's memoryviews
   directly.  They block but release the GIL, hence the "threads" model;
4. optional methods as capabilities: ``flush``, ``unmap``, ``write_same``, ``reconfig``;
5. errors: an ``OSError`` simply propagates and the engine maps its errno to sense.

A path containing ``;`` cannot be expressed (``;`` starts an option).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tcmu_py.handler import ConfigError, DeviceInfo, Handler, opt_bool, opt_int, parse_options

__all__ = ["FileConfig", "FileHandler"]

# --- Linux interfaces Python's os module lacks -------------------------------------------
# os.posix_fallocate() takes no mode flags, and there is no os.fallocate(), so libc's
# fallocate(2) is called through ctypes.  ctypes releases the GIL during the call, like
# os.preadv.  (The cffi shim in native/ is deliberately limited to the ring.)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKDISCARD = 0x1277  # _IO(0x12, 119), linux/fs.h: discard a byte range of a block device

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate  # 64-bit off_t always
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), raising OSError like the os module does."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers per preadv/pwritev call (1024 on Linux)
_PATTERN_CHUNK = 1 << 20  # WRITE SAME writes the pattern in chunks of about this size


@dataclass(frozen=True)
class FileConfig:
    """The parsed config string; ``threads`` None means the class default."""

    path: str
    threads: int | None = None
    direct: bool = False
    readonly: bool = False


_OPTIONS = {"threads": opt_int(1, 64), "direct": opt_bool, "readonly": opt_bool}


class FileHandler(Handler):
    """Serve a device from a file (created at the device size if missing) or block device."""

    subtype = "file"
    cfg_desc = (
        "file//path/to/image[;threads=N][;direct=1][;readonly=1]: a regular file, created "
        "at the device size if missing, or a block device. threads=N worker threads "
        "(default 2), direct=1 opens with O_DIRECT, readonly=1 refuses writes."
    )
    thread_model = "threads"  # preadv/pwritev block; they run on a per-device pool
    threads = 2  # tcmu-runner's file handler uses 2 as well
    native_fua = True  # write(fua=True) calls fdatasync itself

    _fd = -1

    @classmethod
    def parse_config(cls, cfgstring: str) -> FileConfig:
        # Pure: D-Bus CheckConfig calls this without a device, so no file is touched here.
        path, opts = parse_options(cfgstring, _OPTIONS)
        if not path:
            raise ConfigError(cfgstring, "no image path (write file//path/to/image)")
        if not path.startswith("/"):
            raise ConfigError(path, "the image path must be absolute (file//path/to/image)")
        return FileConfig(path, **opts)

    def open(self, dev: DeviceInfo, reopen: bool) -> None:
        self.dev = dev
        cfg = dev.config
        if not isinstance(cfg, FileConfig):  # a caller that did not parse it for us
            cfg = dev.config = self.parse_config(dev.cfgstring)
        self.readonly = cfg.readonly
        flags = os.O_CLOEXEC | (os.O_RDONLY if cfg.readonly else os.O_RDWR)
        if cfg.direct:
            flags |= os.O_DIRECT  # bypass the page cache; the ring's buffers are page-aligned
        created = False
        if not cfg.readonly:
            try:  # O_EXCL tells us whether *we* created it, hence may size it
                fd = os.open(cfg.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                created = True
            except FileExistsError:
                pass
        if not created:
            fd = os.open(cfg.path, flags)
        try:
            self._setup(fd, dev, created)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _setup(self, fd: int, dev: DeviceInfo, created: bool) -> None:
        path = self.dev.config.path
        mode = os.fstat(fd).st_mode
        self._blockdev = stat.S_ISBLK(mode)
        if not (self._blockdev or stat.S_ISREG(mode)):
            raise ConfigError(path, "is neither a regular file nor a block device")
        if created:
            os.ftruncate(fd, dev.size)  # sparse: costs no space until written
        size = os.lseek(fd, 0, os.SEEK_END)  # works for block devices too
        if size < dev.size:
            fix = "use a larger device" if self._blockdev else f"grow it (truncate -s {dev.size})"
            raise ConfigError(
                path,
                f"is {size} bytes, smaller than the device ({dev.size} bytes); "
                f"{fix} or make the device smaller",
            )
        # Without a write cache (WCE=0) every write must be durable when it completes.
        self._write_through = not dev.write_cache
        self._zero_range = True  # until the filesystem says EOPNOTSUPP
        self._punch = self._discard = False
        self.lbprz = False
        if self.readonly:
            return
        if self._blockdev:
            self._discard = _discard_supported(fd)
            # A discarded range of a block device may read back as anything: no LBPRZ.
        else:
            # Punching a hole past EOF changes nothing but tells whether the filesystem
            # can punch at all; if it can, reads of a punched range return zeroes.
            try:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, _round_up(size), 4096)
                self._punch = True
            except OSError:
                self._punch = False
            self.lbprz = self._punch

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    # --- the data path ----------------------------------------------------------------

    def read(self, offset: int, length: int, bufs: Sequence[memoryview]) -> None:
        views = _fit(bufs, length)
        while length > 0:
            n = os.preadv(self._fd, views[:_IOV_MAX], offset)
            if n == 0:  # the image shrank behind our back
                raise OSError(errno.EIO, f"{self.dev.config.path}: end of file at byte {offset}")
            offset += n
            length -= n
            if length:  # a short read: continue where it stopped
                views = _advance(views, n)

    def write(self, offset: int, length: int, bufs: Sequence[memoryview], fua: bool) -> None:
        views = _fit(bufs, length)
        while length > 0:
            n = os.pwritev(self._fd, views[:_IOV_MAX], offset)
            if n == 0:  # cannot happen for a regular file or disk, but never spin
                raise OSError(errno.EIO, f"{self.dev.config.path}: no progress at byte {offset}")
            offset += n
            length -= n
            if length:
                views = _advance(views, n)
        if fua or self._write_through:
            os.fdatasync(self._fd)  # FUA: on stable storage before we answer

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def native_fd(self) -> tuple[int, bool]:
        """The runner's C threads then serve plain READ/WRITE on the image directly
        (the same preadv/pwritev and fdatasync rules as :meth:`read`/:meth:`write`)."""
        return self._fd, self._write_through

    # --- thin provisioning --------------------------------------------------------------

    def can_unmap(self) -> bool:
        return self._punch or self._discard

    def can_write_same(self) -> bool:
        return not self.readonly

    def unmap(self, offset: int, length: int) -> None:
        if self._blockdev:
            fcntl.ioctl(self._fd, BLKDISCARD, struct.pack("=QQ", offset, length))
        else:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_same(self, offset: int, length: int, pattern: bytes, unmap: bool) -> None:
        zeroes = pattern.count(0) == len(pattern)
        if zeroes and unmap and self.lbprz:
            self.unmap(offset, length)  # a hole reads as zeroes: same data, space freed
        elif not (zeroes and self._zero_fill(offset, length)):
            self._fill(offset, length, pattern)
        if self._write_through:
            os.fdatasync(self._fd)

    def _zero_fill(self, offset: int, length: int) -> bool:
        """Zero a range without writing it (allocated, unlike a hole); False if unsupported."""
        if self._zero_range:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:  # tmpfs, for one, cannot
                    raise
                self._zero_range = False
        return False

    def _fill(self, offset: int, length: int, pattern: bytes) -> None:
        """Write ``pattern`` repeatedly; an mmap buffer is page-aligned, as O_DIRECT needs."""
        size = min(length, max(_PATTERN_CHUNK // len(pattern), 1) * len(pattern))
        with mmap.mmap(-1, size) as chunk:
            chunk[:] = pattern * (size // len(pattern))
            view = memoryview(chunk)
            try:
                end = offset + length
                while offset < end:
                    offset += os.pwrite(self._fd, view[: min(size, end - offset)], offset)
            finally:
                view.release()

    # --- live changes -------------------------------------------------------------------

    def reconfig(self, what: str, value: Any) -> None:
        if what == "size":
            size = os.lseek(self._fd, 0, os.SEEK_END)
            if value > size:
                if self._blockdev or self.readonly:
                    raise OSError(errno.ENOSPC, f"{self.dev.config.path} holds only {size} bytes")
                os.ftruncate(self._fd, value)  # grow; never shrink, that would lose data
        elif what == "write_cache":
            self._write_through = not value
        elif what == "cfgstring" and value == self.dev.cfgstring:
            pass  # nothing changes
        else:  # like tcmu-runner's file handler: a new image means a new device
            raise OSError(errno.EOPNOTSUPP, f"the file handler cannot change {what} live")


def _round_up(n: int, to: int = 4096) -> int:
    return (n + to - 1) // to * to


def _fit(bufs: Sequence[memoryview], length: int) -> list[memoryview]:
    """The buffers as a list covering exactly ``length`` bytes."""
    views = list(bufs)
    total = sum(len(v) for v in views)
    while total > length:  # the ring's iovecs can be longer than the transfer
        extra = total - length
        last = views.pop()
        if len(last) > extra:
            views.append(last[: len(last) - extra])
        total -= min(len(last), extra)
    return views


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left after the first ``n`` bytes were transferred."""
    i = 0
    while n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n:
        rest[0] = memoryview(rest[0])[n:]
    return rest


def _discard_supported(fd: int) -> bool:
    """Whether the block device accepts discards (sysfs ``queue/discard_max_bytes`` > 0)."""
    rdev = os.fstat(fd).st_rdev
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    for queue in (f"{base}/queue", f"{base}/../queue"):  # a partition has its disk's queue
        try:
            with open(f"{queue}/discard_max_bytes", encoding="ascii") as f:
                return int(f.read()) > 0
        except (OSError, ValueError):
            continue
    return False
