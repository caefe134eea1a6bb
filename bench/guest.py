#!/usr/bin/env python3
"""Guest benchmark: tcmu-py against Debian's C tcmu-runner and the in-kernel backstores.

Boots ONE qemu guest (tests/vm/run-in-guest.sh, run as root) and runs
bench/_guest_driver.py in it.  Per round, in this order (so the runners alternate
A B A B): tcmu-py serving ``user:file`` (a raw image in the guest's /dev/shm) and
``user:ram``; Debian's ``/usr/bin/tcmu-runner`` serving ``user:qcow`` on the same raw image
(its qcow handler opens a raw file whose size is the device's); the in-kernel ``fileio``
(same image) and ``rd_mcp``.  Every device is a tcm_loop LUN (rtslib); the user backstores
exist with ``hw_max_sectors`` 128 and 1024.  fio: 4 KiB randread/randwrite at QD32 and
1 MiB sequential read/write at QD8 (libaio, direct=1, time based); 4 KiB random jobs do
not depend on hw_max_sectors, so the 128-sector devices run only the sequential ones.

Printed per case: IOPS, MB/s, completion latency p50/p99, the runner's CPU µs per I/O
(utime+stime of the whole runner process from /proc/<pid>/stat around the fio run,
divided by fio's I/O count), then the ratios tcmu-py/C tcmu-runner, tcmu-py file/fileio
and tcmu-py ram/rd_mcp.  Ends with one JSON line holding every figure.

    sudo .venv/bin/python bench/guest.py            # 2 rounds, 6 s / 4 s jobs: ~8-11 min under TCG
    sudo .venv/bin/python bench/guest.py --quick    # 2 rounds, hw_max_sectors 1024, 3 s / 2 s: ~4-8 min
    sudo .venv/bin/python bench/guest.py --profile  # no bench: py-spy the tcmu-py runner (~2 min)

The wall times grow with the host's load (each fio start-up alone takes ~4 s under TCG).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

#: job name -> (fio rw, block size, iodepth)
JOBS: dict[str, tuple[str, str, int]] = {
    "randread4k": ("randread", "4k", 32),
    "randwrite4k": ("randwrite", "4k", 32),
    "seqread1m": ("read", "1M", 8),
    "seqwrite1m": ("write", "1M", 8),
}

#: ratio name -> (numerator backend, denominator backend); the user backends at the same
#: hw_max_sectors, the kernel ones have none.
RATIOS: dict[str, tuple[str, str]] = {
    "tcmu-py-file/tcmu-runner-qcow": ("tcmu-py-file", "tcmu-runner-qcow"),
    "tcmu-py-file/fileio": ("tcmu-py-file", "fileio"),
    "tcmu-py-ram/rd_mcp": ("tcmu-py-ram", "rd_mcp"),
    "tcmu-py-ram/tcmu-runner-qcow": ("tcmu-py-ram", "tcmu-runner-qcow"),
}
KERNEL_BACKENDS = {"fileio", "rd_mcp"}


def fio_command(disk: str, job: str, seconds: float, output: str) -> list[str]:
    rw, bs, qd = JOBS[job]
    return ["fio", f"--name={job}", f"--filename={disk}", "--ioengine=libaio", "--direct=1",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--time_based", f"--runtime={seconds:g}",
            "--norandommap", "--randrepeat=0", "--output-format=json", f"--output={output}"]


def parse_fio_json(text: str) -> dict[str, Any]:
    """IOPS, MB/s, completion latency p50/p99 (µs) and I/O count of a one-job fio JSON report.

    fio may print notes before the JSON; the direction is whichever of read/write did I/O.
    """
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON object in the fio output")
    report = json.loads(text[start:])
    jobs = report["jobs"]
    if len(jobs) != 1:
        raise ValueError(f"expected one fio job, got {len(jobs)}")
    job = jobs[0]
    if job.get("error"):
        raise ValueError(f"fio job failed: error {job['error']}")
    sides = [job[d] for d in ("read", "write") if job.get(d, {}).get("total_ios")]
    if len(sides) != 1:
        raise ValueError("expected I/O in exactly one direction")
    side = sides[0]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": float(side["iops"]),
        "mb_s": side["bw_bytes"] / 1e6,
        "p50_us": pct["50.000000"] / 1e3,
        "p99_us": pct["99.000000"] / 1e3,
        "ios": int(side["total_ios"]),
        "runtime_s": side["runtime"] / 1e3,
    }


def parse_proc_stat(text: str, clk_tck: int) -> float:
    """utime + stime (s) of a /proc/<pid>/stat line (every thread of the process)."""
    rest = text[text.rindex(")") + 2:].split()  # the comm may hold blanks and parentheses
    # rest[0] is field 3 (state): utime is field 14, stime field 15
    return (int(rest[11]) + int(rest[12])) / clk_tck


def proc_cpu_seconds(pid: int) -> float:
    return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def io_window_cpu(samples: list[tuple[int, float]]) -> float | None:
    """CPU seconds spent between the last sample before the I/O counter first moved and the
    first sample after it last moved; ``samples`` are (completed I/Os, CPU seconds) in time
    order.  None when no I/O was seen."""
    if not samples:
        return None
    first_ios = samples[0][0]
    start = end = None
    for i, (ios, _) in enumerate(samples):
        if ios != first_ios and start is None:
            start = i - 1
        if i and ios != samples[i - 1][0]:
            end = i
    if start is None or end is None:
        return None
    return samples[end][1] - samples[start][1]


def parse_rows(lines: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The BENCH-ROW records and the merged BENCH-INFO of the driver's output."""
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    for line in lines:
        line = line.rstrip("\r\n")
        if line.startswith("BENCH-ROW "):
            rows.append(json.loads(line[len("BENCH-ROW "):]))
        elif line.startswith("BENCH-INFO "):
            info.update(json.loads(line[len("BENCH-INFO "):]))
    return rows, info


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One case per (backend, hw_max_sectors, job): the median of the rounds, and each round."""
    groups: dict[tuple[str, int | None, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["backend"], r["hw_max_sectors"], r["job"])].append(r)
    cases = []
    for (backend, hw, job), rs in groups.items():
        case: dict[str, Any] = {"backend": backend, "hw_max_sectors": hw, "job": job, "rounds": len(rs)}
        for key in ("iops", "mb_s", "p50_us", "p99_us", "runner_cpu_us_per_io"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            case[key] = statistics.median(vals) if vals else None
        case["iops_per_round"] = [r["iops"] for r in rs]
        cases.append(case)
    order = {j: i for i, j in enumerate(JOBS)}
    cases.sort(key=lambda c: (order.get(c["job"], 99), c["backend"], c["hw_max_sectors"] or 0))
    return cases


def _find(cases: list[dict[str, Any]], backend: str, hw: int | None, job: str) -> dict[str, Any] | None:
    want_hw = None if backend in KERNEL_BACKENDS else hw
    for c in cases:
        if c["backend"] == backend and c["hw_max_sectors"] == want_hw and c["job"] == job:
            return c
    return None


def ratios(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """IOPS (= MB/s) and CPU-per-I/O ratios of RATIOS, per job and user hw_max_sectors."""
    out = []
    user_hws = sorted({c["hw_max_sectors"] for c in cases if c["hw_max_sectors"] is not None})
    for name, (num_b, den_b) in RATIOS.items():
        for hw in user_hws:
            for job in JOBS:
                num, den = _find(cases, num_b, hw, job), _find(cases, den_b, hw, job)
                if num is None or den is None or not den["iops"]:
                    continue
                r: dict[str, Any] = {"ratio": name, "hw_max_sectors": hw, "job": job,
                                     "iops": num["iops"] / den["iops"]}
                ncpu, dcpu = num.get("runner_cpu_us_per_io"), den.get("runner_cpu_us_per_io")
                r["cpu_per_io"] = ncpu / dcpu if ncpu is not None and dcpu else None
                out.append(r)
    return out


def format_report(cases: list[dict[str, Any]], rats: list[dict[str, Any]]) -> str:
    lines = [f"{'job':11s} {'backend':17s} {'hw':>5s} {'IOPS':>9s} {'MB/s':>8s} {'p50 us':>8s} "
             f"{'p99 us':>8s} {'CPU us/IO':>9s}  IOPS per round"]
    for c in cases:
        cpu = c["runner_cpu_us_per_io"]
        lines.append(
            f"{c['job']:11s} {c['backend']:17s} {c['hw_max_sectors'] or '-'!s:>5s} {c['iops']:9.0f} "
            f"{c['mb_s']:8.1f} {c['p50_us']:8.0f} {c['p99_us']:8.0f} "
            f"{(f'{cpu:9.1f}' if cpu is not None else '        -')}  "
            + " ".join(f"{x:.0f}" for x in c["iops_per_round"]))
    lines.append("")
    lines.append(f"{'ratio':30s} {'hw':>5s} {'job':11s} {'IOPS':>6s} {'CPU/IO':>7s}")
    for r in rats:
        cpu = f"{r['cpu_per_io']:7.2f}" if r["cpu_per_io"] is not None else "      -"
        lines.append(f"{r['ratio']:30s} {r['hw_max_sectors']:5d} {r['job']:11s} {r['iops']:6.2f} {cpu}")
    return "\n".join(lines)


def summarize_profile(raw: str, thread: str = "MainThread", top: int = 12) -> dict[str, Any]:
    """Where one thread's samples go, from py-spy's raw (collapsed) stacks, root first:
    its sample count, the share spent idle in epoll_wait, and its busiest stacks (the
    innermost frames) as shares of all its samples."""
    stacks: dict[str, int] = defaultdict(int)
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if not any(f.startswith("thread (") and f.endswith(thread) for f in frames):
            continue
        n = int(count)
        total += n
        if frames[-1].startswith("epoll_wait"):
            idle += n
            continue
        stacks[" <- ".join(reversed([f for f in frames if not f.startswith("thread (")][-5:]))] += n
    busiest = sorted(stacks, key=lambda k: -stacks[k])[:top]
    return {"thread": thread, "samples": total, "idle": idle / total if total else None,
            "stacks": [(k, stacks[k] / total) for k in busiest]}


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="hw_max_sectors 1024 only, short jobs (~4 min)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rand-seconds", type=float)
    ap.add_argument("--seq-seconds", type=float)
    ap.add_argument("--hw", help="hw_max_sectors of the user backstores (default 128,1024; quick 1024)")
    ap.add_argument("--size-mb", type=int, default=128)
    ap.add_argument("--profile", action="store_true",
                    help="only py-spy the tcmu-py runner during one fio job (py-spy in .venv)")
    ap.add_argument("--profile-job", default="randread4k", choices=list(JOBS),
                    help="the job --profile runs (at the largest --hw)")
    ap.add_argument("--perf", action="store_true",
                    help="with --profile: also a system-wide perf record (did not finish in this guest)")
    ap.add_argument("--from-log", help="only parse a guest-output.log of an earlier run")
    args = ap.parse_args()
    rand_s = args.rand_seconds or (3 if args.quick else 6)
    seq_s = args.seq_seconds or (2 if args.quick else 4)
    hw = args.hw or ("1024" if args.quick else "128,1024")
    host_load0 = loadavg()
    t0 = time.monotonic()
    if args.from_log:
        log = Path(args.from_log)
        rc = 0
    else:
        n_hw = len(hw.split(","))
        # fio wall + ~2 s fio start per job under TCG, ~60 s of runners and rtslib per round
        per_round = (3 + 2 + 2) * (2 * (rand_s + 2)) + (3 * n_hw + 2) * 2 * (seq_s + 2) + 90
        guest_timeout = 400 if args.profile else int(args.rounds * per_round * 1.5) + 120
        run_dir = REPO / ".lab-runs" / f"bench-guest-{time.strftime('%Y%m%d-%H%M%S')}"
        cmd = (f".venv/bin/python bench/_guest_driver.py --rounds {args.rounds} --rand-seconds {rand_s:g} "
               f"--seq-seconds {seq_s:g} --hw {hw} --size-mb {args.size_mb}"
               + (f" --profile-only --profile-job {args.profile_job}" if args.profile else "")
               + (" --perf" if args.perf else ""))
        print(f"# booting one guest (timeout {guest_timeout} s): {cmd}", flush=True)
        env = dict(os.environ, TCMU_VM_QUIET="1")
        proc = subprocess.Popen([str(REPO / "tests/vm/run-in-guest.sh"), "-t", str(guest_timeout), "-o",
                                 str(run_dir), cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        log = run_dir / "guest-output.log"
        assert proc.stdout is not None
        # The guest's output reaches the log file as it runs: follow it for progress.
        pos = 0
        while proc.poll() is None:
            time.sleep(2)
            pos = _follow(log, pos)
        _follow(log, pos)
        print(proc.stdout.read(), end="")
        rc = proc.returncode
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    if args.profile:
        for line in lines:
            if line.startswith("BENCH-PROFILE "):
                prof = json.loads(line[len("BENCH-PROFILE "):])
                summ = summarize_profile(prof["stacks"])
                idle = summ["idle"] or 0.0
                plain, profd = prof.get("unprofiled") or {}, prof.get("profiled_fio") or {}
                print(f"# {prof['tag']}: without py-spy {plain.get('iops', 0):.0f} IOPS, runner "
                      f"{plain.get('runner_cpu_us_per_io') or 0:.0f} CPU us/IO; under py-spy "
                      f"{profd.get('iops', 0):.0f} IOPS")
                print(f"# py-spy, tcmu-py runner main thread, {prof['tag']}: "
                      f"{summ['samples']} samples, {idle:.1%} idle in epoll_wait; busiest stacks:")
                for stack, share in summ["stacks"]:
                    print(f"  {share:6.1%}  {stack[:220]}")
                if prof.get("perf"):
                    print(f"# perf record -a (cpu-clock, whole guest), {prof['tag']}: comm, dso, symbol")
                    print(prof["perf"])
        return rc
    rows, info = parse_rows(lines)
    cases = aggregate(rows)
    rats = ratios(cases)
    print(format_report(cases, rats))
    host_load1 = loadavg()
    print(f"# host load average {' '.join(host_load0)} at start, {' '.join(host_load1)} at end; "
          f"{time.monotonic() - t0:.0f} s")
    print(json.dumps({"bench": "guest", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "host_loadavg_start": host_load0, "host_loadavg_end": host_load1,
                      "host_cpus": os.cpu_count(), "info": info, "cases": cases, "ratios": rats,
                      "rows": rows, "guest_rc": rc}))
    if rc != 0 or not rows:
        print(f"# the guest run failed (rc {rc}, {len(rows)} rows)", file=sys.stderr)
        return 1
    return 0


def _follow(log: Path, pos: int) -> int:
    try:
        with open(log, errors="replace") as f:
            f.seek(pos)
            for line in f.readlines():
                if not line.startswith("BENCH-"):
                    print(line, end="", flush=True)
            return f.tell()
    except FileNotFoundError:
        return pos


if __name__ == "__main__":
    sys.exit(main())
