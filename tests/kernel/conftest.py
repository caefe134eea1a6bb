"""The kernel tier: real target_core_user in the qemu guest (tests/vm/run-guest-tests.sh).

Outside the guest these tests cannot run: with ``CI=true`` that is a failure, locally a skip
that says why. Inside, every configfs/rtslib operation runs in a helper thread with a
deadline, because once replies are enabled a backstore create or delete waits in the kernel
for our ``*_DONE`` and would otherwise hang the whole run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest

from tcmu_py.control import (
    ConfigFS,
    NetlinkEvent,
    TcmuCmd,
    TcmuNetlink,
    bounded_write,
    parse_uio_name,
)

T = TypeVar("T")
OP_TIMEOUT = 60.0  # rtslib under TCG: seconds per operation, not milliseconds
NAME_PREFIX = "tcmupy-"  # every backstore these tests create, so cleanup finds leftovers


@functools.cache
def kernel_unavailable() -> str | None:
    """Why the real kernel tier cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "not root"
    if not os.path.isdir("/sys/module/target_core_user"):
        return "kernel module target_core_user is not loaded (this is not the test guest)"
    if not os.path.isdir("/sys/kernel/config/target/core"):
        return "configfs target/core is not mounted"
    try:
        import rtslib_fb  # noqa: F401
    except ImportError:
        return "rtslib_fb is not importable (python3-rtslib-fb, and a --system-site-packages venv)"
    return None


@pytest.fixture(autouse=True)
def _require_kernel() -> None:
    why = kernel_unavailable()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"kernel tier cannot run: {why}; run it with tests/vm/run-guest-tests.sh")
    pytest.skip(f"kernel tier: {why}; run it with tests/vm/run-guest-tests.sh")


def in_background(fn: Callable[[], T], name: str) -> Future[T]:
    """Run ``fn`` in a daemon thread: if the kernel never lets it go, only the thread leaks."""
    fut: Future[T] = Future()

    def work() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - the Future carries it to the caller
            fut.set_exception(e)

    threading.Thread(target=work, name=name, daemon=True).start()
    return fut


def hba_of(so: Any) -> int:
    """The HBA index rtslib picked: its path ends in ``user_<hba>/<name>``."""
    m = re.search(r"/user_(\d+)/[^/]+$", so.path)
    assert m, so.path
    return int(m.group(1))


class KernelLab:
    """One test's view of the kernel: a TCM-USER listener plus bounded rtslib operations."""

    def __init__(self) -> None:
        self.cfs = ConfigFS()
        self.nl = TcmuNetlink()
        self.nl.open()
        self.backlog: list[NetlinkEvent] = []
        self.pending: list[Future[Any]] = []
        self.objects: dict[str, Any] = {}
        self.raw_dirs: list[str] = []

    # ---- rtslib, off the test thread --------------------------------------------------------

    def create(
        self,
        name: str,
        config: str = "ram/x",
        size: int = 64 << 20,
        hw_max_sectors: int | None = None,
        control: str | None = None,
    ) -> Future[Any]:
        """Start creating backstore ``user:<subtype>/<name>``; the kernel may wait for us."""
        from rtslib_fb import UserBackedStorageObject

        def create() -> Any:
            so = UserBackedStorageObject(
                name, config=config, size=size, hw_max_sectors=hw_max_sectors, control=control
            )
            self.objects[name] = so
            return so

        return self._track(in_background(create, f"create {name}"))

    def delete(self, name: str) -> Future[None]:
        so = self.objects.pop(name)
        return self._track(in_background(so.delete, f"delete {name}"))

    def raw_device(self, name: str, config: str = "ram/raw", size: int = 1 << 20) -> str:
        """A configured but not yet enabled device made with plain configfs writes.

        Unlike rtslib, whose buffered ``enable`` write is issued a second time by close()
        when the first one fails, this lets a test see exactly one enable per write.
        """
        hba = next(n for n in range(100, 200) if not os.path.exists(self.cfs.device_path(n, "")))
        hba_dir = os.path.dirname(self.cfs.device_path(hba, name))
        os.mkdir(hba_dir)
        self.raw_dirs.append(hba_dir)
        path = self.cfs.device_path(hba, name)
        os.mkdir(path)
        self.raw_dirs.append(path)
        for token in (f"dev_config={config}", f"dev_size={size}"):
            bounded_write(os.path.join(path, "control"), token, OP_TIMEOUT)
        return path

    def enable(self, path: str) -> Future[None]:
        """Start the single ``write("1")`` to ``enable`` of a raw device."""
        enable = os.path.join(path, "enable")
        return self._track(in_background(lambda: bounded_write(enable, "1", OP_TIMEOUT), enable))

    def created(self, name: str, **kw: Any) -> Any:
        """A backstore, created with every event answered with success."""
        return self.answer_until(self.create(name, **kw))

    def deleted(self, name: str) -> None:
        self.answer_until(self.delete(name))

    # ---- netlink ---------------------------------------------------------------------------

    def next_event(self, cmd: TcmuCmd, name: str, timeout: float = OP_TIMEOUT) -> NetlinkEvent:
        """The next ``cmd`` event for device ``name``; others are kept in ``backlog``."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.backlog:
                parsed = parse_uio_name(ev.device)
                if ev.cmd == cmd and parsed is not None and parsed.dev_name == name:
                    self.backlog.remove(ev)
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {cmd.name} for {name} within {timeout}s: {self.backlog}")
            select.select([self.nl], [], [], min(left, 0.5))
            self.backlog.extend(self.nl.recv_events())

    def answer_until(self, fut: Future[T], status: int = 0, timeout: float = OP_TIMEOUT) -> T:
        """Reply ``status`` to every event until ``fut`` finishes; its result (or exception)."""
        deadline = time.monotonic() + timeout
        while not fut.done():
            if time.monotonic() > deadline:
                raise AssertionError(f"operation still blocked after {timeout}s")
            select.select([self.nl], [], [], 0.2)
            self.backlog.extend(self.nl.recv_events())
            while self.backlog:
                self.nl.reply(self.backlog.pop(0), status)
        return fut.result(0)

    # ---- teardown --------------------------------------------------------------------------

    def release_waiters(self, *writers: Future[Any]) -> None:
        """What a restarting runner does: fail every pending netlink waiter.

        The kernel hands the waiters -EINTR, and Python retries a write that failed with
        EINTR (PEP 475). So block_netlink must stay set until ``writers`` are done: their
        retries then fail with EAGAIN instead of starting a new wait.
        """
        self.cfs.set_block_netlink(True)
        try:
            self.cfs.reset_netlink()
            for fut in writers:
                with contextlib.suppress(Exception):  # the caller judges the outcome
                    fut.exception(OP_TIMEOUT)
        finally:
            self.cfs.set_block_netlink(False)

    def close(self) -> None:
        # Stop the kernel waiting for replies first, so deletes below cannot hang.
        self.nl.set_features(reply_supported=False)
        stuck = [f for f in self.pending if not f.done()]
        if stuck:
            self.release_waiters(*stuck)
        for name in list(self.objects):
            self.answer_until(self.delete(name))
        for path in reversed(self.raw_dirs):
            self.answer_until(in_background(functools.partial(os.rmdir, path), f"rmdir {path}"))
        self.nl.close()
        assert not self.cfs.block_netlink(), "a test left block_netlink set"

    def _track(self, fut: Future[T]) -> Future[T]:
        self.pending.append(fut)
        return fut


@pytest.fixture
def lab() -> Iterator[KernelLab]:
    lab = KernelLab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_backstores() -> Iterator[None]:
    """After the session, no backstore of ours may remain (and none may block the next run)."""
    yield
    if kernel_unavailable() is not None:
        return
    from rtslib_fb import RTSRoot

    leftovers = [so for so in RTSRoot().storage_objects if so.name.startswith(NAME_PREFIX)]
    for so in leftovers:
        in_background(so.delete, f"cleanup {so.name}").result(OP_TIMEOUT)
    assert not leftovers, f"tests left backstores behind: {[so.name for so in leftovers]}"
