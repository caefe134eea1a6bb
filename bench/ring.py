#!/usr/bin/env python3
"""Ring benchmark: a handler served on the simulated kernel, kernel side in its own process.

For each case (handler, QD, block size, read/write) a forked "kernel" process keeps QD
commands in flight against the runner (the production engine + handler in this
process) for a fixed time.  Printed per case: commands/s, the runner's CPU µs per
command (getrusage of this process over the measured window), MB/s on the wall clock,
MB/s per runner CPU-second, and plain memcpy MB/s of the same size measured in the
same run, with the ratios: against a cache-hot memcpy (the same two buffers over and
over) and against a "spread" memcpy (offsets over a device-sized buffer, as the ram
disk's own copy sees memory).  Ends with one JSON line holding every figure.

The device is written once before the window (steady state, no first-touch page
faults); ``--no-native`` turns the ram handler's native path off, to show what the
Python path alone costs.

``--metrics on|off|both`` runs each case with the per-device counters on, off, or both
(alternating, ``--repeat`` times each, the lowest CPU per command of each kept): the
line then shows the counters' cost as extra runner CPU per command, and the JSON line
carries ``metrics_overhead`` per case (target: under 5 %).

    .venv/bin/python bench/ring.py [--seconds 3] [--handlers ram,file-tmpfs,file-disk]
    .venv/bin/python bench/ring.py --metrics both --repeat 3 [--no-native]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import struct
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tcmu_py.attach import Geometry, open_device
from tcmu_py.engine import Engine
from tcmu_py.ring import Ring
from tcmu_py.sim.kernel import SimKernel

DEV_SIZE = 256 * 1024 * 1024
BLOCK = 512


def memcpy_mbps(size: int, seconds: float = 0.5) -> float:
    src = memoryview(bytearray(os.urandom(size)))
    dst = memoryview(bytearray(size))
    n = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(64):
            dst[:] = src
        n += 64
        el = time.perf_counter() - t0
        if el >= seconds:
            return n * size / el / 1e6


def memcpy_spread_mbps(size: int, seconds: float = 0.5) -> float:
    """memcpy of ``size`` bytes between a ring-sized buffer and offsets spread over a
    device-sized one, in the order the load generator uses: the copy the ram disk really
    does (its data is not in the CPU cache), as opposed to the cache-hot reference."""
    dev = memoryview(bytearray(b"\x5a" * DEV_SIZE))
    dst = memoryview(bytearray(size))
    span = DEV_SIZE // size
    offs = [(i * 7919 % span) * size for i in range(4096)]
    n = 0
    t0 = time.perf_counter()
    while True:
        for off in offs[(n & 4095) : (n & 4095) + 64]:
            dst[:] = dev[off : off + size]
        n += 64
        el = time.perf_counter() - t0
        if el >= seconds:
            return n * size / el / 1e6


def kernel_process(k: SimKernel, qd: int, size: int, write: bool, warmup: float,
                   seconds: float, report_fd: int) -> None:
    """The load generator: keep ``qd`` commands in flight, count completions."""
    nblk = size // BLOCK
    span = DEV_SIZE // size
    payload = os.urandom(size) if write else None
    op = 0x8A if write else 0x88
    cdbs = [struct.pack(">BBQIBB", op, 0, (i * 7919 % span) * nblk, nblk, 0, 0) for i in range(4096)]
    state = {"i": 0, "done": 0, "bad": 0, "counting": False}

    def on_done(res: Any) -> None:
        if res.status:
            state["bad"] += 1
        if state["counting"]:
            state["done"] += 1
        if not state["stop"]:
            submit()

    def submit() -> None:
        i = state["i"] = (state["i"] + 1) & 4095
        k.queue(cdbs[i], payload, 0 if write else size, on_done)

    state["stop"] = False
    import select

    poller = select.poll()
    poller.register(k.kernel_sock, select.POLLIN)
    for _ in range(qd):
        submit()
    t_end_warm = time.monotonic() + warmup
    while time.monotonic() < t_end_warm:
        if poller.poll(100):
            k.irqcontrol()
    os.write(report_fd, b"S")
    state["counting"] = True
    t0 = time.monotonic()
    t_end = t0 + seconds
    while time.monotonic() < t_end:
        if poller.poll(100):
            k.irqcontrol()
    el = time.monotonic() - t0
    state["counting"] = False
    done = state["done"]
    os.write(report_fd, b"E" + json.dumps({"done": done, "elapsed": el, "bad": state["bad"]}).encode())
    state["stop"] = True
    t_drain = time.monotonic() + 5
    while k.commands and time.monotonic() < t_drain:
        if poller.poll(50):
            k.irqcontrol()
    os._exit(0)


def prefill(dev: Any) -> None:
    """Write the whole device once, so the measured window sees steady state: a sparse
    ram disk or file otherwise pays its first-touch page allocation inside the window."""
    chunk = memoryview(bytearray(b"\xa5" * (1 << 20)))
    for off in range(0, DEV_SIZE, len(chunk)):
        dev.handler.write(off, len(chunk), [chunk], False)


def run_case(handler: str, qd: int, size: int, write: bool, seconds: float,
             tmpdir: str, native: bool = True, metrics: bool = True) -> dict[str, Any]:
    from tcmu_py.registry import load_handlers

    handlers = load_handlers(None)
    if handler == "ram":
        cfg = "ram/"
    else:
        where = "/dev/shm" if handler == "file-tmpfs" else tmpdir
        path = os.path.join(where, f"tcmu-bench-{os.getpid()}.img")
        cfg = f"file/{path}"
    k = SimKernel(data_size=256 * 1024 * 1024)
    # The kernel process is forked before the device exists (a fork would make every
    # page of the ram disk copy-on-write in the runner) and starts when told to.
    r_fd, w_fd = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r_fd)
        os.close(go_w)
        try:
            if os.read(go_r, 1) == b"g":
                kernel_process(k, qd, size, write, 1.0, seconds, w_fd)
        finally:
            os._exit(1)
    os.close(w_fd)
    os.close(go_r)
    loop = asyncio.new_event_loop()
    engine = Engine(loop)
    engine.metrics_enabled = metrics
    ring = Ring(k.user_fd, k.map_size, map_fd=k.memfd)
    dev = open_device(engine, ring, handlers, name="bench", dev_config=cfg,
                      geometry=Geometry(DEV_SIZE, BLOCK, 2048))
    if not native:
        dev.native_release()
    prefill(dev)
    os.write(go_w, b"g")
    os.close(go_w)
    marks: dict[str, Any] = {}

    def on_report() -> None:
        data = os.read(r_fd, 65536)
        while data:
            c, data = data[:1], data[1:]
            if c == b"S":
                marks["s"] = resource.getrusage(resource.RUSAGE_SELF)
                marks["w0"] = dev.ring.wakeups
                marks["b0"] = dev.counters["batches"]
            elif c == b"E":
                marks["e"] = resource.getrusage(resource.RUSAGE_SELF)
                marks["w1"] = dev.ring.wakeups
                marks["b1"] = dev.counters["batches"]
                marks["result"] = json.loads(data)
                loop.stop()
                return

    loop.add_reader(r_fd, on_report)
    loop.call_later(seconds + 30, loop.stop)
    loop.run_forever()
    # let the child drain, then tear down
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pid_done, _ = os.waitpid(pid, os.WNOHANG)
        if pid_done:
            break
        loop.run_until_complete(asyncio.sleep(0.01))
    loop.remove_reader(r_fd)
    engine.detach(dev)
    dev.native_release()
    dev.handler.close()
    if dev.pool:
        dev.pool.shutdown()
    ring.close()
    loop.close()
    k.close()
    if handler != "ram":
        os.unlink(path)
    if "result" not in marks:
        raise RuntimeError("the kernel process did not report")
    res = marks["result"]
    s, e = marks["s"], marks["e"]
    cpu = (e.ru_utime - s.ru_utime) + (e.ru_stime - s.ru_stime)
    done = res["done"]
    return {
        "handler": handler,
        "native": native,
        "metrics": metrics,
        "qd": qd,
        "size": size,
        "op": "write" if write else "read",
        "commands": done,
        "errors": res["bad"],
        "cmds_per_s": done / res["elapsed"],
        "runner_cpu_us_per_cmd": cpu / done * 1e6 if done else None,
        "mb_per_s": done * size / res["elapsed"] / 1e6,
        "mb_per_runner_cpu_s": done * size / cpu / 1e6 if cpu else None,
        "cmds_per_batch": done / max(1, marks["b1"] - marks["b0"]),
        "wakeups_per_batch": (marks["w1"] - marks["w0"]) / max(1, marks["b1"] - marks["b0"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--handlers", default="ram")
    ap.add_argument("--qd", default="1,32")
    ap.add_argument("--sizes", default="4096,65536")
    ap.add_argument("--no-native", action="store_true",
                    help="serve every command through Python (the ram handler's native path off)")
    ap.add_argument("--metrics", choices=("on", "off", "both"), default="on",
                    help="per-device counters on, off, or both to measure what they cost")
    ap.add_argument("--repeat", type=int, default=1,
                    help="with --metrics both: runs of each, alternating (the best is kept)")
    args = ap.parse_args()
    tmpdir = tempfile.mkdtemp(prefix="tcmu-bench-", dir="/var/tmp")
    try:
        return _run(args, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _run(args: argparse.Namespace, tmpdir: str) -> int:
    memcpy = {s: memcpy_mbps(s) for s in map(int, args.sizes.split(","))}
    spread = {s: memcpy_spread_mbps(s) for s in memcpy}
    rows = []
    t_start = time.monotonic()
    for handler in args.handlers.split(","):
        for size in map(int, args.sizes.split(",")):
            for qd in map(int, args.qd.split(",")):
                for write in (False, True):
                    r = _measure(args, handler, qd, size, write, tmpdir)
                    r["memcpy_mb_per_s"] = memcpy[size]
                    r["ratio_wall_vs_memcpy"] = r["mb_per_s"] / memcpy[size]
                    r["ratio_runner_vs_memcpy"] = (r["mb_per_runner_cpu_s"] or 0) / memcpy[size]
                    r["memcpy_spread_mb_per_s"] = spread[size]
                    r["ratio_runner_vs_memcpy_spread"] = (r["mb_per_runner_cpu_s"] or 0) / spread[size]
                    rows.append(r)
                    print(
                        f"{handler:10s} {r['op']:5s} {size // 1024:3d}K QD{qd:<3d} "
                        f"{r['cmds_per_s']:9.0f} cmd/s  {r['runner_cpu_us_per_cmd']:6.2f} us/cmd  "
                        f"{r['mb_per_s']:8.1f} MB/s wall  {r['mb_per_runner_cpu_s']:8.1f} MB/s per "
                        f"runner CPU-s  (memcpy {memcpy[size]:.0f} MB/s, ratio "
                        f"{r['ratio_runner_vs_memcpy']:.2f}; spread {spread[size]:.0f} MB/s, ratio "
                        f"{r['ratio_runner_vs_memcpy_spread']:.2f})  {r['cmds_per_batch']:.1f} cmd/batch  "
                        f"errors {r['errors']}" + _overhead_text(r),
                        flush=True,
                    )
    print(f"# {len(rows)} cases in {time.monotonic() - t_start:.0f} s")
    summary: dict[str, Any] = {"bench": "ring", "metrics": args.metrics, "native": not args.no_native,
                               "rows": rows, "memcpy_mb_per_s": memcpy,
                               "memcpy_spread_mb_per_s": spread}
    over = [r["metrics_overhead"] for r in rows if r.get("metrics_overhead") is not None]
    if over:
        micro = metrics_micro_cost()
        summary["metrics_micro_ns"] = micro
        for r in rows:
            r["metrics_overhead_estimate"] = _estimate(r, micro, not args.no_native)
        est = [r["metrics_overhead_estimate"] for r in rows]
        summary["metrics_overhead_estimate_max"] = max(est)
        print(f"# metrics, timed in-process: {micro['per_command_ns']:.0f} ns per command on the "
              f"Python path, {micro['per_batch_ns']:.0f} ns per batch "
              f"({micro['per_batch_ring_check_ns']:.0f} with the ring-full look); "
              f"estimated share of runner CPU per command: max {max(est):.1%} "
              f"({', '.join(f'{e:.1%}' for e in est)})")
        summary["metrics_overhead_max"] = max(over)
        summary["metrics_overhead_mean"] = sum(over) / len(over)
        print(f"# metrics cost: mean {summary['metrics_overhead_mean']:+.1%}, "
              f"max {summary['metrics_overhead_max']:+.1%} runner CPU per command, measured "
              f"(noisy on a loaded machine: compare with the estimate above) "
              f"({'native path on' if not args.no_native else 'every command through Python'})")
    print(json.dumps(summary))
    return 1 if any(r["errors"] for r in rows) else 0


def metrics_micro_cost() -> dict[str, float]:
    """The counters' own cost in ns, timed in-process on a live device (immune to the
    machine's load, unlike CPU per command): the per-command statements of the drain loop,
    and the per-batch work (with and without the ring-full look)."""
    import timeit

    from tcmu_py.ring import Command
    from tcmu_py.sim import SimTarget
    from tcmu_py_handlers.ram import RamHandler

    with SimTarget(RamHandler, "ram/", size=1 << 20) as t:
        dev = t.device
        mt = dev.metrics
        assert mt is not None
        ent = Command(1, bytes([0x88]) + bytes(15), [], 4096)
        ops, op_bytes = mt.ops, mt.op_bytes
        n = 500_000

        def with_counts() -> None:
            ncmd = 0
            for _ in range(n):
                if mt is not None:
                    op = ent.cdb[0]
                    ops[op] += 1
                    op_bytes[op] += ent.data_len
                    ncmd += 1

        def without() -> None:
            for _ in range(n):
                pass

        ring = dev.ring

        def batch(held_min: int) -> Any:
            # the engine's per-batch statements (Device.on_ready), with the real objects
            def run() -> None:
                for _ in range(n // 10):
                    t0 = time.monotonic()
                    pending0 = len(dev.inflight)
                    entries, served = (1,), 0
                    held = pending0 + len(entries) + (ring.native_inflight if ring.native_efd >= 0
                                                      else served)
                    if held > mt.inflight_peak:
                        mt.inflight_peak = held
                    if held >= held_min:
                        size = ring.cmdr_size
                        if size - ring.inflight_bytes() - 1 < max(1024, size >> 6):
                            mt.ring_full += 1
                    done = len(entries) - 0 - (len(dev.inflight) - pending0)
                    if done > 0:
                        b = int((time.monotonic() - t0) * 1e6).bit_length()
                        mt.hist[b if b < 32 else 31] += done
            return run

        best = lambda f: min(timeit.repeat(f, number=1, repeat=5))  # noqa: E731
        return {
            "per_command_ns": (best(with_counts) - best(without)) / n * 1e9,
            "per_batch_ns": best(batch(1 << 30)) / (n // 10) * 1e9,
            "per_batch_ring_check_ns": best(batch(0)) / (n // 10) * 1e9,
        }


def _estimate(r: dict[str, Any], micro: dict[str, float], native: bool) -> float:
    """The counters' share of the runner CPU per command, from the in-process costs."""
    # the ring-full look needs cmdr_size / 16 KiB entries in the ring (512 for the bench's)
    per_batch = micro["per_batch_ring_check_ns"] if r["qd"] >= 512 else micro["per_batch_ns"]
    per_cmd = (0.0 if native else micro["per_command_ns"]) + per_batch / max(1.0, r["cmds_per_batch"])
    return per_cmd / (r["runner_cpu_us_per_cmd_metrics_off"] * 1000)


def _measure(args: argparse.Namespace, handler: str, qd: int, size: int, write: bool,
             tmpdir: str) -> dict[str, Any]:
    """One case; with --metrics both, off and on alternately and the ratio of CPU/command."""
    native = not args.no_native
    if args.metrics != "both":
        return run_case(handler, qd, size, write, args.seconds, tmpdir, native, args.metrics == "on")
    best: dict[bool, dict[str, Any]] = {}
    for _ in range(max(1, args.repeat)):
        for on in (False, True):
            r = run_case(handler, qd, size, write, args.seconds, tmpdir, native, on)
            if on not in best or r["runner_cpu_us_per_cmd"] < best[on]["runner_cpu_us_per_cmd"]:
                best[on] = r
    r = dict(best[True])
    off_us = best[False]["runner_cpu_us_per_cmd"]
    r["errors"] = best[True]["errors"] + best[False]["errors"]
    r["runner_cpu_us_per_cmd_metrics_off"] = off_us
    r["cmds_per_s_metrics_off"] = best[False]["cmds_per_s"]
    r["metrics_overhead"] = r["runner_cpu_us_per_cmd"] / off_us - 1 if off_us else None
    return r


def _overhead_text(r: dict[str, Any]) -> str:
    if r.get("metrics_overhead") is None:
        return ""
    return (f"  metrics: {r['runner_cpu_us_per_cmd_metrics_off']:.2f} -> "
            f"{r['runner_cpu_us_per_cmd']:.2f} us/cmd ({r['metrics_overhead']:+.1%})")


if __name__ == "__main__":
    sys.exit(main())
