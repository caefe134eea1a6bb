#!/usr/bin/env python3
"""librbd from Python, three ways: which one the rbd handler should use.

The same asyncio driver keeps QD operations in flight on one image, with the data in
an anonymous mmap standing for the ring's data area (the handler gets memoryviews of
it), through:

* ``pyrbd``     -- python-rbd 16.2: ``aio_write(bytes(view))`` / ``aio_read`` then a copy
  into the view; librbd calls a Python callback, which hops to the loop with
  ``call_soon_threadsafe`` (the obvious way to use it);
* ``cffi-cb``   -- cffi calls ``rbd_aio_write[v]``/``rbd_aio_read[v]`` on the views
  (no copy in Python), completion through a cffi callback + ``call_soon_threadsafe``;
* ``cffi-poll`` -- the handler's path (``handlers/_librbd.py``): as ``cffi-cb`` but
  librbd signals an eventfd and the loop thread polls finished completions in batches,
  so librbd's threads never take the GIL;
* ``cffi-zc``   -- as ``cffi-poll`` with ``rbd_disable_zero_copy_writes=false`` (librbd
  sends the ring's memory without copying it).  Measured, and rejected: in librbd 16.2 a
  zero-copy write that fails before reaching an OSD (blocklisted client) never
  completes, which ``tests/services/test_rbd.py`` would see as a hung command.

Cases: 4 KiB random write and read at QD32, 1 MiB sequential write and read at QD4
(the 1 MiB buffer in 16 pieces of 64 KiB, as a ring command can be).  Variants
alternate within each round; the median of the rounds is printed with IOPS, MB/s,
process CPU µs per I/O (including librbd's threads) and the loop thread's CPU µs per
I/O, plus ``rbd bench`` as the librbd ceiling.  Ends with one JSON line.

    .venv/bin/python bench/rbd_aio.py [--conf CEPH_CONF] [--seconds 3] [--rounds 3]

Without ``--conf`` it starts a throw-away cluster with ``scripts/ceph.sh``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mmap
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import rados  # noqa: E402
import rbd  # noqa: E402

from tcmu_py_handlers import _librbd  # noqa: E402

POOL, IMAGE = "rbd", "bench"
IMAGE_SIZE = 256 << 20
CASES = [  # name, write?, size, qd, random?, pieces
    ("4k-randwrite", True, 4096, 32, True, 1),
    ("4k-randread", False, 4096, 32, True, 1),
    ("1m-seqwrite", True, 1 << 20, 4, False, 16),
    ("1m-seqread", False, 1 << 20, 4, False, 16),
]


# ---- three ways to submit one operation; each returns an awaitable ----------------------


class PyRbd:
    name = "pyrbd"

    def __init__(self, conf: str) -> None:
        self.cluster = rados.Rados(conffile=conf)
        self.cluster.conf_set("rbd_cache", "false")
        self.cluster.connect(timeout=30)
        self.io = self.cluster.open_ioctx(POOL)
        self.img = rbd.Image(self.io, IMAGE)

    def write(self, loop: asyncio.AbstractEventLoop, off: int, views: list[memoryview]) -> Any:
        fut = loop.create_future()
        data = bytes(views[0]) if len(views) == 1 else b"".join(views)

        def cb(comp: Any) -> None:
            loop.call_soon_threadsafe(_settle, fut, comp.get_return_value())

        self.img.aio_write(data, off, cb)
        return fut

    def read(self, loop: asyncio.AbstractEventLoop, off: int, views: list[memoryview]) -> Any:
        fut = loop.create_future()
        length = sum(len(v) for v in views)

        def cb(comp: Any, data: bytes) -> None:
            loop.call_soon_threadsafe(_scatter, fut, comp.get_return_value(), data, views)

        self.img.aio_read(off, length, cb)
        return fut

    def close(self) -> None:
        self.img.close()
        self.io.close()
        self.cluster.shutdown()


def _settle(fut: asyncio.Future[Any], rv: int) -> None:
    if rv < 0:
        fut.set_exception(OSError(-rv, os.strerror(-rv)))
    else:
        fut.set_result(None)


def _scatter(fut: asyncio.Future[Any], rv: int, data: bytes, views: list[memoryview]) -> None:
    pos = 0
    for v in views:
        v[:] = data[pos : pos + len(v)]
        pos += len(v)
    _settle(fut, rv if rv < 0 else 0)


def _open(conf: str, zero_copy: bool = False) -> tuple[_librbd.Cluster, Any, _librbd.AioImage]:
    cluster = _librbd.Cluster("admin")
    cluster.read_conf(conf)
    cluster.conf_set("rbd_cache", "false")
    if zero_copy:
        cluster.conf_set("rbd_disable_zero_copy_writes", "false")
    cluster.connect()
    io = cluster.ioctx(POOL)
    return cluster, io, _librbd.AioImage(cluster, io, IMAGE)


class CffiPoll:
    name = "cffi-poll"

    def __init__(self, conf: str) -> None:
        self.cluster, self.io, self.img = _open(conf)

    def write(self, loop: asyncio.AbstractEventLoop, off: int, views: list[memoryview]) -> Any:
        return self.img.write(off, sum(len(v) for v in views), views)

    def read(self, loop: asyncio.AbstractEventLoop, off: int, views: list[memoryview]) -> Any:
        return self.img.read(off, sum(len(v) for v in views), views)

    def close(self) -> None:
        self.img.close(10)
        self.cluster.destroy_ioctx(self.io)
        self.cluster.shutdown()


class CffiPollZeroCopy(CffiPoll):
    """As the handler, plus ``rbd_disable_zero_copy_writes=false``: librbd sends the
    ring's memory itself instead of copying it first (not used: see the docstring)."""

    name = "cffi-zc"

    def __init__(self, conf: str) -> None:
        self.cluster, self.io, self.img = _open(conf, zero_copy=True)


class CffiCallback(CffiPoll):
    """cffi data path, but completions through a Python callback in librbd's thread."""

    name = "cffi-cb"

    def __init__(self, conf: str) -> None:
        super().__init__(conf)
        ffi, self.lib = self.img.ffi, self.img.rbd
        self.ffi = ffi
        self.pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Any]] = {}
        self.ids = iter(range(1, 1 << 62))
        self.cp = ffi.new("rbd_completion_t *")

        @ffi.callback("void(rbd_completion_t, void *)")
        def done(comp: Any, arg: Any) -> None:
            rv = self.lib.rbd_aio_get_return_value(comp)
            self.lib.rbd_aio_release(comp)
            loop, fut, _keep = self.pending.pop(int(ffi.cast("uintptr_t", arg)))
            loop.call_soon_threadsafe(_settle, fut, rv)

        self.callback = done

    def _submit(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., int], off: int,
                views: list[memoryview], writable: bool) -> Any:
        ffi = self.ffi
        fut = loop.create_future()
        oid = next(self.ids)
        keep = [ffi.from_buffer(v, require_writable=writable) for v in views]
        iov = ffi.new("struct iovec[]", len(keep))
        for i, k in enumerate(keep):
            iov[i].iov_base = k
            iov[i].iov_len = len(k)
        self.pending[oid] = (loop, fut, (keep, iov))
        self.lib.rbd_aio_create_completion(ffi.cast("void *", oid), self.callback, self.cp)
        fn(self.img.handle, iov, len(keep), off, self.cp[0])
        return fut

    def write(self, loop: asyncio.AbstractEventLoop, off: int, views: list[memoryview]) -> Any:
        return self._submit(loop, self.lib.rbd_aio_writev, off, views, False)

    def read(self, loop: asyncio.AbstractEventLoop, off: int, views: list[memoryview]) -> Any:
        return self._submit(loop, self.lib.rbd_aio_readv, off, views, True)


VARIANTS = [PyRbd, CffiCallback, CffiPoll, CffiPollZeroCopy]


# ---- the driver ------------------------------------------------------------------------------


async def drive(way: Any, write: bool, size: int, qd: int, rand: bool, pieces: int,
                seconds: float, area: memoryview) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    rnd = random.Random(1)
    span = IMAGE_SIZE // size
    piece = size // pieces
    slots = [[area[(s * size) + p * piece : (s * size) + (p + 1) * piece] for p in range(pieces)]
             for s in range(qd)]
    op = way.write if write else way.read
    state = {"n": 0, "seq": 0, "stop": False}

    def next_off() -> int:
        if rand:
            return rnd.randrange(span) * size
        state["seq"] = (state["seq"] + 1) % span
        return state["seq"] * size

    async def worker(slot: list[memoryview]) -> None:
        while not state["stop"]:
            await op(loop, next_off(), slot)
            state["n"] += 1

    ru0, th0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time(), time.perf_counter()
    tasks = [asyncio.ensure_future(worker(s)) for s in slots]
    await asyncio.sleep(seconds)
    state["stop"] = True
    n_at_stop, t1 = state["n"], time.perf_counter()
    ru1, th1 = resource.getrusage(resource.RUSAGE_SELF), time.thread_time()
    await asyncio.gather(*tasks)
    el = t1 - t0
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return {
        "iops": n_at_stop / el,
        "mbps": n_at_stop * size / el / 1e6,
        "cpu_us_per_io": cpu / max(n_at_stop, 1) * 1e6,
        "loop_us_per_io": (th1 - th0) / max(n_at_stop, 1) * 1e6,
    }


def rbd_bench(conf: str, write: bool, size: int, qd: int, rand: bool) -> dict[str, float]:
    total = min(IMAGE_SIZE, 64 << 20) if size <= 4096 else IMAGE_SIZE
    cmd = ["rbd", "-c", conf, "bench", "--io-type", "write" if write else "read",
           "--io-size", str(size), "--io-threads", str(qd), "--io-total", str(total),
           "--io-pattern", "rand" if rand else "seq", f"{POOL}/{IMAGE}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    # last line: "elapsed: 2   ops: 16384   ops/sec: 7650.27   bytes/sec: 30 MiB/s"
    fields = out.strip().splitlines()[-1].split()
    iops = float(fields[fields.index("ops/sec:") + 1])
    return {"iops": iops, "mbps": iops * size / 1e6}


def prefill(conf: str) -> None:
    """Reads of never-written objects are answered by librbd itself: write them all."""
    cluster = rados.Rados(conffile=conf)
    cluster.connect(timeout=30)
    with cluster.open_ioctx(POOL) as io:
        with contextlib.suppress(rbd.ImageNotFound):
            rbd.RBD().remove(io, IMAGE)
        rbd.RBD().create(io, IMAGE, IMAGE_SIZE)
        with rbd.Image(io, IMAGE) as img:
            chunk = os.urandom(4 << 20)
            comps = [img.aio_write(chunk, off, None) for off in range(0, IMAGE_SIZE, len(chunk))]
            for c in comps:
                c.wait_for_complete_and_cb()
    cluster.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conf", help="ceph.conf of a running cluster (default: start one)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    tmp = None
    conf = args.conf
    if conf is None:
        tmp = tempfile.mkdtemp(prefix="tcmu-bench-ceph-")
        env = {**os.environ, "CEPH_OSD_SIZE": "2G", "CEPH_LIFETIME": "1800"}
        conf = subprocess.run([os.path.join(ROOT, "scripts", "ceph.sh"), "start", f"{tmp}/c"],
                              stdout=subprocess.PIPE, text=True, check=True, timeout=120,
                              env=env).stdout.strip()
    try:
        prefill(conf)
        area = memoryview(mmap.mmap(-1, 64 << 20))
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, write, size, qd, rand, pieces in CASES:
            runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for variant in VARIANTS:
                    way = variant(conf)
                    try:
                        runs[variant.name].append(asyncio.run(
                            drive(way, write, size, qd, rand, pieces, args.seconds, area)))
                    finally:
                        way.close()
            row = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                   for v, rs in runs.items()}
            row["rbd-bench"] = rbd_bench(conf, write, size, qd, rand)
            results[name] = row
            base = row["pyrbd"]
            print(f"\n{name} (QD{qd}, median of {args.rounds} x {args.seconds:g} s)")
            print(f"  {'variant':10} {'IOPS':>9} {'MB/s':>8} {'CPU µs/IO':>10} {'loop µs/IO':>11} "
                  f"{'IOPS vs pyrbd':>14}")
            for v, r in row.items():
                extra = (f"{r['cpu_us_per_io']:10.1f} {r['loop_us_per_io']:11.1f}"
                         if "cpu_us_per_io" in r else f"{'':10} {'':11}")
                print(f"  {v:10} {r['iops']:9.0f} {r['mbps']:8.1f} {extra} "
                      f"{r['iops'] / base['iops']:13.2f}x")
        print(json.dumps({"bench": "rbd_aio", "seconds": args.seconds, "rounds": args.rounds,
                          "results": results}))
    finally:
        if tmp is not None:
            subprocess.run([os.path.join(ROOT, "scripts", "ceph.sh"), "stop", f"{tmp}/c"],
                           timeout=120, check=False)
            os.rmdir(tmp)


if __name__ == "__main__":
    main()
