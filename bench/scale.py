#!/usr/bin/env python3
"""Scale benchmark: one engine serving 1, 16, 64, 256 ``ram`` devices on the simulated kernel.

Each device count runs in a fresh Python process (so one count's memory does not carry
over into the next).  In it, the runner is the production engine + ram handler on one
asyncio loop; the kernel side of every device (a :class:`~tcmu_py.sim.kernel.SimKernel`
each, small rings) lives in one forked process that keeps QD commands of 4 KiB READ(16)
in flight per device for a fixed window and counts completions.

Reported per count: the runner's RSS (from /proc/self/smaps: total, the ring mappings,
the ram disks' own mappings, and the runner proper = total minus both), its thread count,
aggregate commands/s and the runner's CPU µs per command.  The issue's targets: runner
RSS ≤ 60 MB with one device, growing ≤ 1 MB per extra device; the thread count does not
grow with the number of devices (ram is an inline handler).  Ends with one JSON line.

    .venv/bin/python bench/scale.py [--counts 1,16,64,256] [--seconds 3] [--qd 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import resource
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEV_SIZE = 16 * 1024 * 1024
BLOCK = 512
IO_SIZE = 4096
RING_DATA = 1024 * 1024  # room for QD8 x 4 KiB many times over
RING_CMDR = 64 * 1024
RSS_TARGET_ONE_MB = 60.0
RSS_TARGET_PER_DEVICE_MB = 1.0


def smaps_rss(ranges: list[tuple[int, int]]) -> dict[str, int]:
    """Rss (bytes) of this process from /proc/self/smaps: total, the memfd-backed ring
    mappings (the runner's and the simulated kernel's view of them), and the mappings
    that start inside ``ranges`` (the ram disks)."""
    total = rings = stores = 0
    kind = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                start = int(first.split("-")[0], 16)
                if "memfd:tcmu-sim" in line:
                    kind = "ring"
                elif any(lo <= start < hi for lo, hi in ranges):
                    kind = "store"
                else:
                    kind = ""
            elif first == "Rss:":
                kb = int(line.split()[1]) * 1024
                total += kb
                if kind == "ring":
                    rings += kb
                elif kind == "store":
                    stores += kb
    return {"total": total, "rings": rings, "stores": stores}


def kernel_process(kernels: list[Any], qd: int, warmup: float, seconds: float, report_fd: int) -> None:
    """Keep ``qd`` 4 KiB reads in flight on every device; count completions in the window."""
    nblk = IO_SIZE // BLOCK
    span = DEV_SIZE // IO_SIZE
    cdbs = [struct.pack(">BBQIBB", 0x88, 0, (i * 7919 % span) * nblk, nblk, 0, 0) for i in range(4096)]
    state = {"done": 0, "bad": 0, "counting": False, "stop": False}

    def submitter(k: Any) -> Any:
        idx = [0]

        def on_done(res: Any) -> None:
            if res.status:
                state["bad"] += 1
            if state["counting"]:
                state["done"] += 1
            if not state["stop"]:
                submit()

        def submit() -> None:
            i = idx[0] = (idx[0] + 1) & 4095
            k.queue(cdbs[i], None, IO_SIZE, on_done)

        return submit

    poller = select.poll()
    by_fd = {}
    for k in kernels:
        poller.register(k.kernel_sock, select.POLLIN)
        by_fd[k.kernel_sock.fileno()] = k
        submit = submitter(k)
        for _ in range(qd):
            submit()

    def spin(until: float) -> None:
        while time.monotonic() < until:
            for fd, _ in poller.poll(100):
                by_fd[fd].irqcontrol()

    spin(time.monotonic() + warmup)
    os.write(report_fd, b"S")
    state["counting"] = True
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    spin(t0 + seconds)
    el = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    state["counting"] = False
    kcpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    os.write(report_fd, b"E" + json.dumps({"done": state["done"], "elapsed": el, "bad": state["bad"],
                                           "kernel_cpu_s": kcpu}).encode())
    state["stop"] = True
    deadline = time.monotonic() + 10
    while any(k.commands for k in kernels) and time.monotonic() < deadline:
        for fd, _ in poller.poll(50):
            by_fd[fd].irqcontrol()
    os._exit(0)


def run_count(n: int, qd: int, seconds: float) -> dict[str, Any]:
    """Serve ``n`` ram devices in this process; the measurements (one count per process)."""
    from tcmu_py.attach import Geometry, open_device
    from tcmu_py.engine import Engine
    from tcmu_py.registry import load_handlers
    from tcmu_py.ring import Ring
    from tcmu_py.sim.kernel import SimKernel

    handlers = load_handlers(None)
    base = smaps_rss([])
    # The simulated kernels live only in the kernel process, forked before anything else:
    # their own state (e.g. a 64 Ki-entry free id list, ~2.5 MB each) never touches this
    # process's heap.  Each device's channel end and memfd come over a socket, as a real
    # runner gets only /dev/uioN.
    fd_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r_fd, w_fd = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r_fd)
        os.close(go_w)
        fd_sock.close()
        try:
            kernels = [SimKernel(cmdr_size=RING_CMDR, data_size=RING_DATA) for _ in range(n)]
            for k in kernels:
                socket.send_fds(child_sock, [struct.pack("<Q", k.map_size)], [k.user_fd, k.memfd])
            if os.read(go_r, 1) == b"g":
                kernel_process(kernels, qd, 1.0, seconds, w_fd)
        finally:
            os._exit(1)
    child_sock.close()
    os.close(w_fd)
    os.close(go_r)
    chans = []
    for _ in range(n):
        msg, fds, _flags, _addr = socket.recv_fds(fd_sock, 8, 2)
        if len(fds) != 2:
            raise RuntimeError("the kernel process did not send a device")
        chans.append((fds[0], fds[1], struct.unpack("<Q", msg)[0]))
    fd_sock.close()
    loop = asyncio.new_event_loop()
    engine = Engine(loop)
    devs = []
    for i, (user_fd, memfd, map_size) in enumerate(chans):
        ring = Ring(user_fd, map_size, map_fd=memfd)
        devs.append(open_device(engine, ring, handlers, name=f"scale{i}", dev_config="ram/",
                                geometry=Geometry(DEV_SIZE, BLOCK, 128)))
    stores = []
    for d in devs:
        mem = d.handler.native_memory()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        stores.append((addr, addr + len(mem)))
    idle = smaps_rss(stores)
    threads_idle = len(os.listdir("/proc/self/task"))
    os.write(go_w, b"g")
    os.close(go_w)
    marks: dict[str, Any] = {}

    def on_report() -> None:
        data = os.read(r_fd, 65536)
        while data:
            c, data = data[:1], data[1:]
            if c == b"S":
                marks["s"] = resource.getrusage(resource.RUSAGE_SELF)
            elif c == b"E":
                marks["e"] = resource.getrusage(resource.RUSAGE_SELF)
                marks["threads"] = len(os.listdir("/proc/self/task"))
                marks["result"] = json.loads(data)
                loop.stop()
                return

    loop.add_reader(r_fd, on_report)
    loop.call_later(seconds + 60, loop.stop)
    loop.run_forever()
    loaded = smaps_rss(stores)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            break
        loop.run_until_complete(asyncio.sleep(0.01))
    loop.remove_reader(r_fd)
    for d in devs:
        engine.detach(d)
        d.native_release()
        d.handler.close()
        if d.pool:
            d.pool.shutdown()
        d.ring.close()
    loop.close()
    for user_fd, memfd, _ in chans:
        for fd in (user_fd, memfd):
            with contextlib.suppress(OSError):  # the ring may have closed it
                os.close(fd)
    if "result" not in marks:
        raise RuntimeError("the kernel process did not report")
    res = marks["result"]
    cpu = (marks["e"].ru_utime - marks["s"].ru_utime) + (marks["e"].ru_stime - marks["s"].ru_stime)
    mb = 1e6

    def runner(m: dict[str, int]) -> float:
        return (m["total"] - m["rings"] - m["stores"]) / mb

    return {
        "devices": n,
        "qd": qd,
        "commands": res["done"],
        "errors": res["bad"],
        "cmds_per_s": res["done"] / res["elapsed"],
        "runner_cpu_us_per_cmd": cpu / res["done"] * 1e6 if res["done"] else None,
        "kernel_side_cpu_us_per_cmd": res["kernel_cpu_s"] / res["done"] * 1e6 if res["done"] else None,
        "threads_idle": threads_idle,
        "threads": marks["threads"],
        "rss_before_devices_mb": base["total"] / mb,
        "rss_total_mb": loaded["total"] / mb,
        "rss_rings_mb": loaded["rings"] / mb,
        "rss_ram_disks_mb": loaded["stores"] / mb,
        "rss_runner_mb": runner(loaded),
        "rss_runner_idle_mb": runner(idle),
    }


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets against the measured rows."""
    by_n = {r["devices"]: r for r in rows}
    one = by_n.get(1)
    out: dict[str, Any] = {}
    if one is not None:
        out["rss_one_device_mb"] = one["rss_runner_mb"]
        out["rss_one_device_ok"] = one["rss_runner_mb"] <= RSS_TARGET_ONE_MB
        growth = [(r["rss_runner_mb"] - one["rss_runner_mb"]) / (r["devices"] - 1)
                  for r in rows if r["devices"] > 1]
        out["rss_growth_mb_per_device_max"] = max(growth) if growth else None
        out["rss_growth_ok"] = all(g <= RSS_TARGET_PER_DEVICE_MB for g in growth)
        out["threads_constant"] = len({r["threads"] for r in rows}) == 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1,16,64,256")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--qd", type=int, default=8)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one count, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_count(args.one, args.qd, args.seconds)))
        return 0
    rows = []
    t0 = time.monotonic()
    for n in map(int, args.counts.split(",")):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--qd", str(args.qd),
               "--seconds", str(args.seconds)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 240, check=False)
        if res.returncode != 0:
            print(f"# {n} devices failed (rc {res.returncode}):\n{res.stderr}", file=sys.stderr)
            return 1
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{n:4d} devices  QD{args.qd}  {r['cmds_per_s']:8.0f} cmd/s  runner "
              f"{r['runner_cpu_us_per_cmd']:6.2f} us/cmd (kernel side "
              f"{r['kernel_side_cpu_us_per_cmd']:6.2f})  RSS runner {r['rss_runner_mb']:6.1f} MB "
              f"(idle {r['rss_runner_idle_mb']:.1f}; total {r['rss_total_mb']:.1f} = rings "
              f"{r['rss_rings_mb']:.1f} + ram disks {r['rss_ram_disks_mb']:.1f} + runner)  "
              f"threads {r['threads']}  errors {r['errors']}", flush=True)
    v = verdict(rows)
    load = Path("/proc/loadavg").read_text().split()[:3]
    growth = v.get("rss_growth_mb_per_device_max") or 0.0
    print(f"# targets: RSS with one device {v.get('rss_one_device_mb', 0):.1f} MB "
          f"(<= {RSS_TARGET_ONE_MB:g}: {v.get('rss_one_device_ok')}), growth max {growth:.3f} MB/device "
          f"(<= {RSS_TARGET_PER_DEVICE_MB:g}: {v.get('rss_growth_ok')}), threads constant: "
          f"{v.get('threads_constant')}; load average {' '.join(load)}; {time.monotonic() - t0:.0f} s")
    print(json.dumps({"bench": "scale", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "loadavg": load, "rows": rows, "targets": v}))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
