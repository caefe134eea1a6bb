#!/usr/bin/env python3
"""Inside the qemu guest: the measurements of bench/guest.py (run that, not this).

Per round, three phases in a fixed order, so the runners alternate A B A B:

* ``tcmu-py``: start ``tcmu-py-runner``, create ``user:file`` (the shared raw image) and
  ``user:ram`` backstores, once per ``hw_max_sectors``, fio on each, delete, stop;
* ``tcmu-runner``: start Debian's C ``/usr/bin/tcmu-runner``, the same with ``user:qcow``
  on the same raw image (its qcow handler serves a raw file whose size is the device's),
  delete, stop;
* ``kernel``: in-kernel ``fileio`` on the same image and ``rd_mcp``, the ceiling.

Only one runner runs at a time (both take ``/run/tcmu.lock`` and the uio devices).  Every
LUN sits on one tcm_loop target made with rtslib.  The 4 KiB random jobs do not depend on
``hw_max_sectors`` (4 KiB is below both limits), so the 128-sector devices run only the
1 MiB sequential jobs.  Each fio run prints one ``BENCH-ROW <json>`` line; the runner's CPU
comes from /proc/<pid>/stat (all threads) around the fio process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guest import JOBS, fio_command, io_window_cpu, parse_fio_json, proc_cpu_seconds

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
WWN = "naa.5001405aabbcc300"
PREFIX = "bench-"
OP_TIMEOUT = 90.0
C_RUNNER = "/usr/bin/tcmu-runner"


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


T0 = time.monotonic()


def bounded(fn: Callable[[], T], what: str, timeout: float = OP_TIMEOUT) -> T:
    """Run ``fn`` in a daemon thread with a deadline (a configfs write may wait for a runner)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["r"] = fn()
        except BaseException as e:  # noqa: BLE001 - carried to the caller
            box["e"] = e

    t = threading.Thread(target=work, name=what, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{what}: still blocked after {timeout} s")
    if "e" in box:
        raise box["e"]
    return box["r"]


class Runner:
    """One runner process (tcmu-py's or the C one), its log in ``logdir``."""

    def __init__(self, kind: str, logdir: Path) -> None:
        self.kind = kind
        self.logdir = logdir / kind
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.logdir / ("tcmu-py-runner.log" if self.kind == "tcmu-py" else "tcmu-runner.log")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 180.0) -> None:
        offset = len(self.log())
        if self.kind == "tcmu-py":
            cmd = [str(REPO / ".venv/bin/tcmu-py-runner"), "-l", str(self.logdir), "--no-dbus"]
            ready = r"tcmu-py runner ready"
        else:
            # No system bus in the guest: tcmu-runner logs that it cannot own its name and
            # serves the devices all the same.
            cmd = [C_RUNNER, "-l", str(self.logdir)]
            ready = r"Handler rbd is registered"
        out = open(self.logdir / "stdout.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + timeout
        while not re.search(ready, self.log()[offset:]):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()[offset:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.kind} not ready in {timeout} s")
            time.sleep(0.2)
        if self.kind != "tcmu-py":
            time.sleep(1.0)  # its netlink socket opens after the handlers are registered

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def loopback_disk(wwn: str, lun: int, timeout: float = 60.0) -> str:
    """/dev/sdX of a LUN of a tcm_loop target."""
    address = Path(f"/sys/kernel/config/target/loopback/{wwn}/tpgt_1/address").read_text().strip()
    block = Path(f"/sys/bus/scsi/devices/{address}:{lun}/block")
    deadline = time.monotonic() + timeout
    while not (block.is_dir() and any(block.iterdir())):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no block device for {address}:{lun} in {timeout} s")
        time.sleep(0.1)
    dev = Path("/dev") / next(block.iterdir()).name
    while not dev.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dev} did not appear")
        time.sleep(0.1)
    return str(dev)


@contextmanager
def exported(specs: list[tuple[str, Callable[[], Any]]]) -> Iterator[dict[str, str]]:
    """Create the storage objects, export them as LUNs 0.. of one tcm_loop target; name -> disk.
    Everything is removed on the way out (while the runner that serves them still runs)."""
    from rtslib_fb import LUN, TPG, FabricModule, Target

    made: list[Any] = []

    def create() -> None:
        tpg = TPG(Target(FabricModule("loopback"), WWN), 1)
        for lun, (_, make) in enumerate(specs):
            so = make()
            made.append(so)
            LUN(tpg, lun, so)

    def remove() -> None:
        loop = FabricModule("loopback")
        for t in loop.targets:
            if t.wwn == WWN:
                t.delete()
        for so in made:
            so.delete()

    try:
        bounded(create, "create", OP_TIMEOUT * 2)
        disks = {name: loopback_disk(WWN, lun) for lun, (name, _) in enumerate(specs)}
        for dev in disks.values():
            Path(f"/sys/block/{os.path.basename(dev)}/queue/scheduler").write_text("none")
        yield disks
    finally:
        bounded(remove, "remove", OP_TIMEOUT * 2)


class CpuWindow:
    """The runner's CPU time over the window in which the disk really did I/O.

    A thread samples the disk's completed-I/O counters (/sys/block/X/stat) and the runner's
    utime+stime every 20 ms; fio's own start-up and exit (seconds under TCG) stay out."""

    def __init__(self, disk: str, pid: int) -> None:
        self.stat = Path(f"/sys/block/{os.path.basename(disk)}/stat")
        self.pid = pid
        self.samples: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cpu-window", daemon=True)

    def _ios(self) -> int:
        f = self.stat.read_text().split()
        return int(f[0]) + int(f[4])

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((self._ios(), proc_cpu_seconds(self.pid)))
            self.stop.wait(0.02)
        self.samples.append((self._ios(), proc_cpu_seconds(self.pid)))

    def __enter__(self) -> CpuWindow:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)

    def cpu_seconds(self) -> float | None:
        return io_window_cpu(self.samples)


def run_fio(disk: str, job: str, seconds: float, pid: int | None, outdir: Path) -> dict[str, Any]:
    out = outdir / "fio.json"
    cmd = fio_command(disk, job, seconds, str(out))
    t0 = time.monotonic()
    if pid:
        with CpuWindow(disk, pid) as win:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 90, check=False)
    else:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 90, check=False)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        raise RuntimeError(f"fio {job} on {disk}: rc {res.returncode}\n{res.stdout}\n{res.stderr}")
    row = parse_fio_json(out.read_text())
    row["fio_wall_s"] = wall
    if pid:
        cpu = win.cpu_seconds()
        row["runner_cpu_s"] = cpu
        row["runner_cpu_us_per_io"] = cpu / row["ios"] * 1e6 if cpu is not None and row["ios"] else None
    return row


def prefill(disk: str, seconds_cap: float = 60.0) -> None:
    """One sequential write pass over a memory-backed device: no first-touch page
    allocation inside the measured windows."""
    subprocess.run(["fio", "--name=prefill", f"--filename={disk}", "--ioengine=libaio", "--direct=1",
                    "--rw=write", "--bs=1M", "--iodepth=8", "--output=/dev/null"],
                   check=True, timeout=seconds_cap, capture_output=True)


def measure(args: argparse.Namespace, rnd: int, backend: str, disk: str, hw: int | None,
            jobs: list[str], pid: int | None, outdir: Path) -> None:
    for job in jobs:
        seconds = args.rand_seconds if job.startswith("rand") else args.seq_seconds
        row = run_fio(disk, job, seconds, pid, outdir)
        row.update({"round": rnd, "backend": backend, "hw_max_sectors": hw, "job": job})
        cpu = row.get("runner_cpu_us_per_io")
        say(f"r{rnd} {backend:16s} hw={hw!s:5s} {job:10s} {row['iops']:9.0f} IOPS {row['mb_s']:8.1f} MB/s "
            f"p50 {row['p50_us']:8.0f} us p99 {row['p99_us']:8.0f} us"
            + (f"  runner {cpu:.1f} CPU us/IO" if cpu is not None else ""))
        print("BENCH-ROW " + json.dumps(row), flush=True)


def user_phase(args: argparse.Namespace, rnd: int, kind: str, image: Path, size: int,
               logdir: Path, outdir: Path) -> None:
    from rtslib_fb import UserBackedStorageObject

    runner = Runner(kind, logdir)
    say(f"r{rnd} starting {kind}")
    runner.start()
    try:
        specs: list[tuple[str, Callable[[], Any]]] = []
        cases: list[tuple[str, str, int]] = []
        for hw in args.hw:
            if kind == "tcmu-py":
                backs = [("tcmu-py-file", f"file/{image}"), ("tcmu-py-ram", "ram/")]
            else:
                backs = [("tcmu-runner-qcow", f"qcow/{image}")]
            for backend, cfg in backs:
                name = f"{PREFIX}{backend}-{hw}"
                specs.append((name, lambda n=name, c=cfg, h=hw: UserBackedStorageObject(
                    n, config=c, size=size, hw_max_sectors=h)))
                cases.append((name, backend, hw))
        with exported(specs) as disks:
            for name, backend, _hw in cases:
                if backend.endswith("ram"):
                    prefill(disks[name])
            for name, backend, hw in cases:
                # 4 KiB random I/O is the same for any hw_max_sectors: only at the largest.
                jobs = list(JOBS) if hw == max(args.hw) else [j for j in JOBS if j.startswith("seq")]
                measure(args, rnd, backend, disks[name], hw, jobs, runner.pid, outdir)
    finally:
        rc = runner.stop()
        say(f"r{rnd} {kind} stopped, rc {rc}")


def kernel_phase(args: argparse.Namespace, rnd: int, image: Path, size: int, outdir: Path) -> None:
    from rtslib_fb import FileIOStorageObject, RDMCPStorageObject

    specs: list[tuple[str, Callable[[], Any]]] = [
        (PREFIX + "fileio", lambda: FileIOStorageObject(PREFIX + "fileio", dev=str(image), size=size,
                                                        write_back=True)),
        (PREFIX + "rd_mcp", lambda: RDMCPStorageObject(PREFIX + "rd_mcp", size=size)),
    ]
    with exported(specs) as disks:
        prefill(disks[PREFIX + "rd_mcp"])
        measure(args, rnd, "fileio", disks[PREFIX + "fileio"], None, list(JOBS), None, outdir)
        measure(args, rnd, "rd_mcp", disks[PREFIX + "rd_mcp"], None, list(JOBS), None, outdir)


def profile(pid: int, disk: str, outdir: Path, tag: str, job: str, perf: bool = False) -> None:
    """py-spy on the runner during a fio ``job`` (when py-spy is installed)."""
    spy = REPO / ".venv/bin/py-spy"
    if not spy.exists():
        say("profile: no .venv/bin/py-spy (pip install py-spy)")
        return
    out = outdir / f"py-spy-{tag.replace(' ', '-')}.txt"
    # the same job without py-spy first: what the profiled case costs undisturbed
    plain = run_fio(disk, job, 6 if job.startswith("rand") else 4, pid, outdir)
    say(f"profile {tag}: unprofiled {plain['iops']:.0f} IOPS, runner "
        f"{plain.get('runner_cpu_us_per_io') or 0:.0f} CPU us/IO")
    fio = subprocess.Popen(fio_command(disk, job, 14, str(outdir / "prof-fio.json")),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(4)  # fio's start-up under TCG
        cmd = [str(spy), "record", "--pid", str(pid), "--duration", "8", "--native", "--threads",
               "--idle", "--format", "raw", "--output", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        say(f"profile {tag}: py-spy rc {res.returncode} -> {out} {res.stderr[-300:]!r}")
    finally:
        fio.wait(60)
    profiled = parse_fio_json((outdir / "prof-fio.json").read_text())
    print("BENCH-PROFILE " + json.dumps({"tag": tag, "unprofiled": plain, "profiled_fio": profiled,
                                         "stacks": out.read_text() if out.exists() else "",
                                         "perf": perf_profile(disk, outdir, job) if perf else ""}),
          flush=True)


def perf_profile(disk: str, outdir: Path, job: str) -> str:
    """System-wide ``perf record`` (cpu-clock: TCG has no PMU) during the same fio job:
    where every CPU of the guest spends its time, by command and symbol."""
    if not Path("/usr/bin/perf").exists():
        return ""
    data = outdir / "perf.data"
    fio = subprocess.Popen(fio_command(disk, job, 12, str(outdir / "perf-fio.json")),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(4)
        # no build-id pass at the end: it reads every DSO over 9p, minutes under TCG
        rec = subprocess.run(["perf", "record", "-e", "cpu-clock", "-a", "--no-buildid", "--no-buildid-cache",
                              "-o", str(data), "--", "sleep", "6"], capture_output=True, text=True,
                             timeout=60, check=False)
        if rec.returncode != 0:
            return f"perf record failed: rc {rec.returncode} {rec.stderr[-300:]}"
    except subprocess.TimeoutExpired:
        return "perf record did not finish in 60 s"
    finally:
        fio.wait(60)
    try:
        rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "comm,dso,sym",
                              "--percent-limit", "0.7"], capture_output=True, text=True, timeout=120,
                             check=False)
    except subprocess.TimeoutExpired:
        return "perf report did not finish in 120 s"
    return "\n".join(line for line in rep.stdout.splitlines() if line and not line.startswith("#"))


def profile_only(image: Path, size: int, logdir: Path, outdir: Path, job: str, hw: int,
                 perf: bool) -> None:
    from rtslib_fb import UserBackedStorageObject

    runner = Runner("tcmu-py", logdir)
    runner.start()
    try:
        specs: list[tuple[str, Callable[[], Any]]] = [
            (PREFIX + "prof-file", lambda: UserBackedStorageObject(
                PREFIX + "prof-file", config=f"file/{image}", size=size, hw_max_sectors=hw)),
            (PREFIX + "prof-ram", lambda: UserBackedStorageObject(
                PREFIX + "prof-ram", config="ram/", size=size, hw_max_sectors=hw)),
        ]
        with exported(specs) as disks:
            prefill(disks[PREFIX + "prof-ram"])
            profile(runner.pid, disks[PREFIX + "prof-file"], outdir, f"file hw {hw} {job}", job, perf)
            profile(runner.pid, disks[PREFIX + "prof-ram"], outdir, f"ram hw {hw} {job}", job, perf)
    finally:
        runner.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rand-seconds", type=float, default=10)
    ap.add_argument("--seq-seconds", type=float, default=5)
    ap.add_argument("--hw", default="128,1024")
    ap.add_argument("--size-mb", type=int, default=128)
    ap.add_argument("--image-dir", default="/dev/shm")
    ap.add_argument("--profile-only", action="store_true", help="py-spy the tcmu-py runner, no bench")
    ap.add_argument("--profile-job", default="randread4k", choices=list(JOBS))
    ap.add_argument("--perf", action="store_true", help="with --profile-only: also perf record -a")
    args = ap.parse_args()
    args.hw = [int(x) for x in args.hw.split(",")]
    size = args.size_mb << 20
    run_dir = Path(os.environ.get("TCMU_VM_RUN_DIR", "/tmp"))
    logdir = run_dir / "bench-logs"
    outdir = Path("/tmp/bench-out")
    outdir.mkdir(parents=True, exist_ok=True)
    image = Path(args.image_dir) / "tcmu-bench.img"
    with open(image, "wb") as f:  # allocated up front: the same pages for every backstore
        os.posix_fallocate(f.fileno(), 0, size)
    print("BENCH-INFO " + json.dumps({
        "guest_loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "guest_cpus": os.cpu_count(), "kernel": os.uname().release, "image": str(image),
        "size_mb": args.size_mb, "rounds": args.rounds, "rand_seconds": args.rand_seconds,
        "seq_seconds": args.seq_seconds, "hw_max_sectors": args.hw}), flush=True)
    if args.profile_only:
        profile_only(image, size, logdir, outdir, args.profile_job, max(args.hw), args.perf)
        image.unlink()
        return 0
    for rnd in range(1, args.rounds + 1):
        user_phase(args, rnd, "tcmu-py", image, size, logdir, outdir)
        user_phase(args, rnd, "tcmu-runner", image, size, logdir, outdir)
        kernel_phase(args, rnd, image, size, outdir)
    print("BENCH-INFO " + json.dumps({"guest_loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
                                      "guest_elapsed_s": time.monotonic() - T0}), flush=True)
    image.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
