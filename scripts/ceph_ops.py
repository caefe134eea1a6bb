#!/usr/bin/env python3
"""Cluster operations for ``scripts/ceph.sh``, over one librados connection.

Each ``ceph`` CLI call costs about 0.2 s of Python start-up; the start sequence needs a
dozen mon commands, so they run here, in one process, polling every 50 ms.  Needs a
Python that imports Debian's ``rados``/``rbd`` (the venv made with
``--system-site-packages`` does).  Every wait is bounded by TIMEOUT seconds; exit 0 means
done, and a failure prints one line on stderr.

    ceph_ops.py DIR TIMEOUT osd-new UUID...        print the allocated OSD ids
    ceph_ops.py DIR TIMEOUT ready NOSDS [POOL PG_NUM [NAME:SIZE ...]]
    ceph_ops.py DIR TIMEOUT osd-up ID              wait until osd.ID is up
    ceph_ops.py DIR TIMEOUT osd-down ID            mark osd.ID down, wait until it is
    ceph_ops.py DIR TIMEOUT wait-mgr               wait for an active mgr
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from typing import Any, NoReturn

import rados
import rbd


def die(msg: str) -> NoReturn:
    sys.stderr.write(f"ceph_ops: {msg}\n")
    sys.exit(1)


def size_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


def check_daemons(d: str) -> None:
    """Fail fast when a recorded daemon died (a zombie counts as dead)."""
    for f in glob.glob(os.path.join(d, "pids", "*.pid")):
        name = os.path.basename(f)[:-4]
        if name == "watchdog":
            continue
        with open(f) as fh:
            pid = int(fh.read().strip())
        try:
            with open(f"/proc/{pid}/stat") as st:
                state = st.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = "gone"
        if state in ("Z", "X", "gone"):
            die(f"daemon {name} (pid {pid}) died; see {d}/log/{name}.log")


def mon(cluster: rados.Rados, timeout: int, **cmd: Any) -> bytes:
    # mon_command's own timeout defaults to 0 = forever (a mgr-only prefix hangs then)
    ret, out, err = cluster.mon_command(json.dumps(cmd), b"", timeout=timeout)
    if ret < 0:
        die(f"mon command {cmd['prefix']!r} failed: {os.strerror(-ret)}: {err}")
    return bytes(out)


def wait(pred: Any, deadline: float, what: str, d: str) -> None:
    while not pred():
        check_daemons(d)
        if time.monotonic() > deadline:
            die(f"timed out waiting for {what}")
        time.sleep(0.05)


def osd_is_up(cluster: rados.Rados, timeout: int, osd: int) -> bool:
    dump = json.loads(mon(cluster, timeout, prefix="osd dump", format="json"))
    return any(o["osd"] == osd and o["up"] for o in dump["osds"])


def ready(cluster: rados.Rados, d: str, timeout: int, deadline: float, args: list[str]) -> None:
    nosds = int(args[0])
    t0 = time.monotonic()

    def all_up() -> bool:
        st = json.loads(mon(cluster, timeout, prefix="osd stat", format="json"))
        return bool(st["num_up_osds"] == nosds)

    wait(all_up, deadline, f"{nosds} OSD(s) up", d)
    steps = [f"osds up {time.monotonic() - t0:.2f}s"]
    if len(args) >= 3:
        pool, pg_num, images = args[1], int(args[2]), args[3:]
        mon(cluster, timeout, prefix="osd pool create", pool=pool, pg_num=pg_num,
            pgp_num=pg_num, pool_type="replicated")
        with cluster.open_ioctx(pool) as io:
            rbd.RBD().pool_init(io, False)
            steps.append(f"pool {pool} {time.monotonic() - t0:.2f}s")
            # A tiny write to ~32 objects per PG proves every PG is active, without a mgr.
            n = 32 * max(pg_num, 1)
            comps = [io.aio_write_full(f"probe.{i}", b"x") for i in range(n)]
            for c in comps:
                while not c.is_complete():
                    if time.monotonic() > deadline:
                        check_daemons(d)
                        die(f"timed out: a PG of pool {pool} does not serve I/O")
                    time.sleep(0.005)
                if c.get_return_value() < 0:
                    die(f"probe write failed: {os.strerror(-c.get_return_value())}")
            for c in [io.aio_remove(f"probe.{i}") for i in range(n)]:
                c.wait_for_complete()
            steps.append(f"PGs active {time.monotonic() - t0:.2f}s")
            for spec in images:
                name, size = spec.split(":", 1)
                rbd.RBD().create(io, name, size_bytes(size))
    sys.stderr.write("ceph_ops: " + ", ".join(steps) + "\n")


def main() -> None:
    if len(sys.argv) < 4:
        die("usage: ceph_ops.py DIR TIMEOUT OP [ARGS...]")
    d, timeout, op, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    deadline = time.monotonic() + timeout
    cluster = rados.Rados(conffile=os.path.join(d, "ceph.conf"), name="client.admin")
    cluster.conf_set("rados_osd_op_timeout", str(timeout))
    cluster.conf_set("rados_mon_op_timeout", str(timeout))
    cluster.conf_set("client_mount_timeout", str(timeout))
    try:
        cluster.connect(timeout=timeout)
    except rados.Error as e:
        die(f"cannot connect to the mon: {e}")
    try:
        if op == "osd-new":
            for uuid in args:
                print(mon(cluster, timeout, prefix="osd new", uuid=uuid).decode().strip())
        elif op in ("osd-up", "osd-down"):
            osd = int(args[0])
            if op == "osd-down":
                mon(cluster, timeout, prefix="osd down", ids=[str(osd)])
                wait(lambda: not osd_is_up(cluster, timeout, osd), deadline, f"osd.{osd} down", d)
            else:
                wait(lambda: osd_is_up(cluster, timeout, osd), deadline, f"osd.{osd} up", d)
        elif op == "wait-mgr":
            wait(lambda: json.loads(mon(cluster, timeout, prefix="mgr stat", format="json"))
                 ["available"], deadline, "an active mgr", d)
        elif op == "ready":
            ready(cluster, d, timeout, deadline, args)
        else:
            die(f"unknown op {op!r}")
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
