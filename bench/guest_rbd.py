#!/usr/bin/env python3
"""tcmu-py vs Debian's tcmu-runner (C) serving ``user:rbd``, in the qemu guest.

In one guest boot, on one Ceph image (``tests/kernel/ceph_guest.py``: memstore, one OSD,
127.0.0.1, prefilled so that reads reach the OSD), the two runners take turns, A B A B:
each turn starts the runner, creates the ``user:rbd`` backstore with rtslib, exports it
through tcm_loop and runs fio on ``/dev/sdX`` (libaio, O_DIRECT, time based):

* 4 KiB random read and random write at QD32,
* 1 MiB sequential read and write at QD4,

then removes the backstore and stops the runner (both take ``/run/tcmu.lock``; only one
may listen to the kernel).  The C runner gets a private system bus, as on a host.  Then
``rbd bench`` gives the librbd ceiling for the same cases.  Printed: IOPS, MB/s, the
runner's CPU µs per I/O (``/proc/<pid>/stat``, all threads), the tcmu-py / C ratios, and
last one JSON line.  The median of the rounds is reported.

    tests/vm/run-in-guest.sh -t 1500 '.venv/bin/python bench/guest_rbd.py'            # ~10 min
    tests/vm/run-in-guest.sh -t 900  '.venv/bin/python bench/guest_rbd.py --quick'    # ~4-5 min

Under TCG the guest's Ceph is the bottleneck (``rbd bench`` measured 80-90 4 KiB IOPS at
QD32 with the host loaded), so compare the runners with each other and per I/O CPU,
not with a host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.kernel import ceph_guest  # noqa: E402 - after the path is set

POOL, IMAGE = "rbd", "bench"
IMAGE_SIZE = 64 << 20
WWN = "naa.5001405aabbcc7b0"
NAME = "tcmupy-bench-rbd"
OP_TIMEOUT = 180.0  # rtslib/configfs under TCG, and the runner's reply
START_TIMEOUT = 240.0
TICK = os.sysconf("SC_CLK_TCK")
#: name, fio rw, block size, queue depth
CASES = [("4k-randread", "randread", 4096, 32), ("4k-randwrite", "randwrite", 4096, 32),
         ("1m-seqread", "read", 1 << 20, 4), ("1m-seqwrite", "write", 1 << 20, 4)]
RUNNERS = ("tcmu-py", "tcmu-runner")


def log(msg: str) -> None:
    print(f"[guest_rbd {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


T0 = time.monotonic()


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of one name summed): librbd's threads are named
    (msgr-worker-N, io_context_pool, tp_librbd ...), the runner's Python threads too."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            head, tail = task.joinpath("stat").read_text().rsplit(")", 1)
            name = re.sub(r"[-_:]?\d+$", "", head.split("(", 1)[1])
            fields = tail.split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


# ---- runners ---------------------------------------------------------------------------------

class Runner:
    def __init__(self, kind: str, logdir: Path) -> None:
        self.kind, self.logdir = kind, logdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.logdir / f"{self.kind}.out", "ab")  # noqa: SIM115 - the child keeps it
        if self.kind == "tcmu-py":
            log_file = self.logdir / "tcmu-py-runner.log"
            offset = log_file.stat().st_size if log_file.exists() else 0
            self.proc = subprocess.Popen([sys.executable, "-m", "tcmu_py.cli", "-l", str(self.logdir),
                                          "--no-dbus"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
            self._wait(lambda: log_file.exists()
                       and "tcmu-py runner ready" in log_file.read_text(errors="replace")[offset:])
        else:
            self.proc = subprocess.Popen(["/usr/bin/tcmu-runner", "-l", str(self.logdir)],
                                         stdout=out, stderr=subprocess.STDOUT)
            self._wait(lambda: _name_owned("org.kernel.TCMUService1"))
        out.close()

    def _wait(self, ready: Any) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}; see {self.logdir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} was not ready within {START_TIMEOUT:g} s")
            time.sleep(0.3)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _name_owned(name: str) -> bool:
    res = subprocess.run(["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
                          "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                          f"string:{name}"], capture_output=True, text=True, timeout=30, check=False)
    return res.returncode == 0 and "boolean true" in res.stdout


@contextlib.contextmanager
def system_bus() -> Iterator[None]:
    """A system bus for the C runner (the guest has none; Debian's policy file is there)."""
    Path("/run/dbus").mkdir(parents=True, exist_ok=True)
    Path("/run/dbus/pid").unlink(missing_ok=True)
    res = subprocess.run(["dbus-daemon", "--system", "--fork", "--print-pid"], capture_output=True,
                         text=True, timeout=60, check=True)
    pid = int(res.stdout.split()[0])
    try:
        yield
    finally:
        os.kill(pid, signal.SIGTERM)


# ---- the LUN ---------------------------------------------------------------------------------

def bounded(fn: Any, what: str) -> Any:
    """Run ``fn`` in a thread with a deadline: configfs may wait for a runner that died."""
    from tests.kernel.conftest import in_background

    return in_background(fn, what).result(OP_TIMEOUT)


def export_lun(config: str) -> str:
    from rtslib_fb import LUN, TPG, FabricModule, Target, UserBackedStorageObject

    def create() -> None:
        so = UserBackedStorageObject(NAME, config=config, size=IMAGE_SIZE)
        LUN(TPG(Target(FabricModule("loopback"), WWN), 1), 0, so)

    bounded(create, "create the bench LUN")
    return loopback_disk()


def remove_lun() -> None:
    from rtslib_fb import FabricModule, RTSRoot, Target

    def remove() -> None:
        loop = FabricModule("loopback")
        if any(t.wwn == WWN for t in loop.targets):
            Target(loop, WWN, mode="lookup").delete()
        for so in RTSRoot().storage_objects:
            if so.name == NAME:
                so.delete()

    bounded(remove, "remove the bench LUN")


def loopback_disk(timeout: float = 60.0) -> str:
    address = Path(f"/sys/kernel/config/target/loopback/{WWN}/tpgt_1/address").read_text().strip()
    block = Path(f"/sys/bus/scsi/devices/{address}:0/block")
    deadline = time.monotonic() + timeout
    while not (block.is_dir() and any(block.iterdir())):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no block device for {address}:0 in {timeout:g} s")
        time.sleep(0.2)
    dev = Path("/dev") / next(block.iterdir()).name
    while not dev.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{dev} did not appear")
        time.sleep(0.2)
    Path(f"/sys/block/{dev.name}/device/timeout").write_text("180")
    return str(dev)


# ---- measurements ----------------------------------------------------------------------------

def fio(disk: str, rw: str, bs: int, qd: int, seconds: float, pid: int) -> dict[str, float]:
    cpu0, threads0 = cpu_seconds(pid), thread_cpu(pid)
    res = subprocess.run(
        ["fio", "--output-format=json", f"--filename={disk}", "--name=bench", "--ioengine=libaio",
         "--direct=1", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={IMAGE_SIZE}",
         "--time_based", f"--runtime={seconds:g}", "--randrepeat=0", "--norandommap"],
        capture_output=True, text=True, timeout=seconds + 180, check=False)
    cpu = cpu_seconds(pid) - cpu0
    threads = {k: v - threads0.get(k, 0.0) for k, v in thread_cpu(pid).items()}
    if res.returncode != 0:
        raise RuntimeError(f"fio {rw} failed ({res.returncode}): {res.stderr[-2000:]}")
    (job,) = json.loads(res.stdout[res.stdout.index("{"):])["jobs"]
    side = job["read" if "read" in rw else "write"]
    if job["error"]:
        raise RuntimeError(f"fio {rw}: error {job['error']}")
    ios = side["total_ios"]
    secs = side["runtime"] / 1000 or seconds
    top = sorted(threads.items(), key=lambda kv: -kv[1])[:4]
    return {"iops": ios / secs, "mbps": side["io_bytes"] / secs / 1e6,
            "cpu_us_per_io": cpu / max(ios, 1) * 1e6, "ios": ios,
            "threads_us_per_io": {k: round(v / max(ios, 1) * 1e6) for k, v in top if v > 0}}


NUMERIC = ("iops", "mbps", "cpu_us_per_io", "ios")


def profile(disk: str, pid: int, seconds: float, logdir: Path) -> None:
    """py-spy (pip-installed into the venv) on the runner during a 4 KiB random read run:
    the Python functions where its threads spend their samples, self and inclusive."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        log("--profile: no py-spy next to the interpreter (pip install py-spy)")
        return
    raw = logdir / "py-spy-4k-randread.txt"
    prof = subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "50",
                             "--nonblocking", "-f", "raw", "-o", str(raw)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fio(disk, "randread", 4096, 32, seconds, pid)
    try:
        prof.wait(seconds + 120)
    except subprocess.TimeoutExpired:
        prof.kill()
        prof.wait(10)
    if not raw.exists():
        log("--profile: py-spy wrote nothing")
        return
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    log(f"py-spy: {total} samples of the runner's Python threads (idle excluded); self:")
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:12]:
        log(f"  {n / max(total, 1):6.1%}  {f}")
    log("inclusive:")
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:15]:
        log(f"  {n / max(total, 1):6.1%}  {f}")


def rbd_bench(conf: str, rw: str, bs: int, qd: int, seconds: float) -> dict[str, float]:
    write = "write" in rw
    # about as many I/Os as fio did at the runners' pace (rbd bench has no time limit)
    total = min(IMAGE_SIZE, int(seconds / 8 * (32 << 20 if bs > 4096 else 8 << 20)))
    cmd = ["rbd", "-c", conf, "bench", "--io-type", "write" if write else "read", "--io-size", str(bs),
           "--io-threads", str(qd), "--io-total", str(total),
           "--io-pattern", "rand" if rw.startswith("rand") else "seq", f"{POOL}/{IMAGE}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 4 + 240,
                         check=True).stdout
    # last line: "elapsed: 2   ops: 16384   ops/sec: 7650.27   bytes/sec: 30 MiB/s"
    fields = out.strip().splitlines()[-1].split()
    iops = float(fields[fields.index("ops/sec:") + 1])
    return {"iops": iops, "mbps": iops * bs / 1e6}


def prefill(conf: str) -> None:
    """Reads of never-written objects never reach the OSD: write the whole image once."""
    subprocess.run(["rbd", "-c", conf, "bench", "--io-type", "write", "--io-size", str(4 << 20),
                    "--io-threads", "4", "--io-total", str(IMAGE_SIZE), "--io-pattern", "seq",
                    f"{POOL}/{IMAGE}"], capture_output=True, timeout=600, check=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one round of 8 s per case")
    ap.add_argument("--seconds", type=float, help="per fio run (default 15, --quick 8)")
    ap.add_argument("--rounds", type=int, help="A B rounds (default 2, --quick 1)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the tcmu-py runner during an extra 4 KiB random read run")
    args = ap.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 15.0)
    rounds = args.rounds or (1 if args.quick else 2)
    if os.environ.get("TCMU_VM_GUEST") != "1":
        print("guest_rbd: run it in the guest: tests/vm/run-in-guest.sh '.venv/bin/python "
              "bench/guest_rbd.py'", file=sys.stderr)
        return 2
    why = ceph_guest.unavailable()
    if why:
        print(f"guest_rbd: no Ceph: {why}", file=sys.stderr)
        return 1
    logdir = Path(os.environ.get("TCMU_VM_RUN_DIR") or tempfile.mkdtemp()) / "guest-rbd"
    logdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="guest-rbd-"))
    log(f"starting Ceph (load average in the guest {loadavg()})")
    cluster = ceph_guest.start(work / "ceph", lifetime=3600, images=f"{IMAGE}:{IMAGE_SIZE >> 20}M",
                               osd_size="1G")
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        r: {c[0]: [] for c in CASES} for r in RUNNERS}
    ceiling: dict[str, dict[str, float]] = {}
    try:
        prefill(cluster.conf)
        log("image prefilled")
        config = f"rbd/{POOL}/{IMAGE};conf={cluster.conf};osd_op_timeout=60"
        with system_bus():
            for rnd in range(rounds):
                for kind in RUNNERS:
                    runner = Runner(kind, logdir)
                    runner.start()
                    log(f"round {rnd + 1}: {kind} (pid {runner.pid}) ready")
                    try:
                        disk = export_lun(config)
                        for name, rw, bs, qd in CASES:
                            r = fio(disk, rw, bs, qd, seconds, runner.pid)
                            runs[kind][name].append(r)
                            log(f"  {kind:11} {name:13} {r['iops']:8.0f} IOPS {r['mbps']:7.1f} MB/s "
                                f"{r['cpu_us_per_io']:8.0f} CPU µs/IO; by thread "
                                f"{r['threads_us_per_io']}")
                        if args.profile and kind == "tcmu-py" and rnd == rounds - 1:
                            profile(disk, runner.pid, seconds, logdir)
                    finally:
                        remove_lun()
                        runner.stop()
        for name, rw, bs, qd in CASES:
            ceiling[name] = rbd_bench(cluster.conf, rw, bs, qd, seconds)
            log(f"  rbd bench   {name:13} {ceiling[name]['iops']:8.0f} IOPS")
    finally:
        ceph_guest.stop(cluster)

    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"\nmedian of {rounds} round(s) x {seconds:g} s; guest load average {loadavg()}")
    print(f"  {'case':13} {'runner':12} {'IOPS':>8} {'MB/s':>8} {'CPU µs/IO':>10}")
    for name, *_ in CASES:
        row: dict[str, Any] = {
            k: {m: statistics.median(r[m] for r in runs[k][name]) for m in NUMERIC} for k in RUNNERS}
        row["rbd-bench"] = ceiling[name]
        py, c = row["tcmu-py"], row["tcmu-runner"]
        row["ratio"] = {"iops": py["iops"] / c["iops"],
                        "cpu_us_per_io": py["cpu_us_per_io"] / max(c["cpu_us_per_io"], 1e-9)}
        results[name] = row
        for k in (*RUNNERS, "rbd-bench"):
            r = row[k]
            cpu = f"{r['cpu_us_per_io']:10.0f}" if "cpu_us_per_io" in r else f"{'':10}"
            print(f"  {name:13} {k:12} {r['iops']:8.0f} {r['mbps']:8.1f} {cpu}")
        print(f"  {name:13} {'py / C':12} {row['ratio']['iops']:7.2f}x {'':8} "
              f"{row['ratio']['cpu_us_per_io']:9.2f}x")
    print(json.dumps({"bench": "guest_rbd", "seconds": seconds, "rounds": rounds,
                      "loadavg": loadavg(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
