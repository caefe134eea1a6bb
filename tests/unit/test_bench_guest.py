"""bench/guest.py's parsing and ratio helpers (the guest run itself is not a unit test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "guest.py"


@pytest.fixture(scope="module")
def guest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_guest", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_guest"] = mod
    spec.loader.exec_module(mod)
    return mod


def fio_report(read_ios: int = 0, write_ios: int = 0, iops: float = 1000.0, error: int = 0) -> str:
    def side(ios: int) -> dict[str, Any]:
        return {"total_ios": ios, "iops": iops if ios else 0.0, "bw_bytes": int(iops * 4096) if ios else 0,
                "runtime": 10000 if ios else 0,
                "clat_ns": {"percentile": {"50.000000": 250000, "99.000000": 1800000}} if ios else {}}

    job = {"jobname": "x", "error": error, "read": side(read_ios), "write": side(write_ios)}
    return "note: fio says hello\n" + json.dumps({"fio version": "fio-3.33", "jobs": [job]})


def test_parse_fio_json_picks_the_direction_that_did_io(guest: ModuleType) -> None:
    r = guest.parse_fio_json(fio_report(write_ios=12345, iops=1234.5))
    assert r == {"iops": 1234.5, "mb_s": pytest.approx(1234.5 * 4096 / 1e6, rel=1e-3), "p50_us": 250.0,
                 "p99_us": 1800.0, "ios": 12345, "runtime_s": 10.0}


@pytest.mark.parametrize("text", [
    fio_report(),                                  # no I/O at all
    fio_report(read_ios=5, write_ios=5),           # both directions: not one of our jobs
    fio_report(read_ios=5, error=5),               # fio reported an error
    "fio: no JSON here",
])
def test_parse_fio_json_refuses_what_it_cannot_trust(guest: ModuleType, text: str) -> None:
    with pytest.raises(ValueError):
        guest.parse_fio_json(text)


def test_parse_proc_stat_sums_utime_and_stime_past_an_odd_comm(guest: ModuleType) -> None:
    fields = ["S", "1", "1", "0", "0", "-1", "4194560", "1625", "0", "136", "0", "102", "405"]
    line = "155 (tcmu (runner) x) " + " ".join(fields + ["0"] * 30)
    assert guest.parse_proc_stat(line, 100) == pytest.approx(5.07)


def test_io_window_cpu_counts_only_while_the_disk_moves(guest: ModuleType) -> None:
    # (completed I/Os, CPU s): idle start-up, I/O from sample 2 to 4, idle exit
    samples = [(10, 0.0), (10, 0.5), (20, 0.7), (30, 1.2), (40, 1.6), (40, 1.7), (40, 3.0)]
    assert guest.io_window_cpu(samples) == pytest.approx(1.6 - 0.5)
    assert guest.io_window_cpu([(10, 0.0), (10, 1.0)]) is None
    assert guest.io_window_cpu([]) is None


def _row(backend: str, hw: int | None, job: str, iops: float, cpu: float | None, rnd: int) -> dict[str, Any]:
    return {"backend": backend, "hw_max_sectors": hw, "job": job, "iops": iops, "mb_s": iops * 4096 / 1e6,
            "p50_us": 100.0, "p99_us": 900.0, "runner_cpu_us_per_io": cpu, "round": rnd}


def test_aggregate_takes_the_median_of_the_rounds_and_ratios_match_hw(guest: ModuleType) -> None:
    rows = [
        _row("tcmu-py-file", 1024, "randread4k", 900, 30.0, 1),
        _row("tcmu-py-file", 1024, "randread4k", 1100, 50.0, 2),
        _row("tcmu-py-file", 1024, "randread4k", 1000, 40.0, 3),
        _row("tcmu-runner-qcow", 1024, "randread4k", 2000, 20.0, 1),
        _row("tcmu-runner-qcow", 128, "randread4k", 4000, 10.0, 1),  # other hw: must not be used
        _row("fileio", None, "randread4k", 4000, None, 1),
        _row("tcmu-py-ram", 1024, "randread4k", 3000, 10.0, 1),
        _row("rd_mcp", None, "randread4k", 6000, None, 1),
    ]
    cases = guest.aggregate(rows)
    py = next(c for c in cases if c["backend"] == "tcmu-py-file")
    assert (py["iops"], py["runner_cpu_us_per_io"], py["rounds"]) == (1000, 40.0, 3)
    assert py["iops_per_round"] == [900, 1100, 1000]
    got = {(r["ratio"], r["hw_max_sectors"]): r for r in guest.ratios(cases)}
    c = got[("tcmu-py-file/tcmu-runner-qcow", 1024)]
    assert (c["iops"], c["cpu_per_io"]) == (0.5, 2.0)
    assert got[("tcmu-py-file/fileio", 1024)]["iops"] == 0.25
    assert got[("tcmu-py-file/fileio", 1024)]["cpu_per_io"] is None  # the kernel has no runner
    assert got[("tcmu-py-ram/rd_mcp", 1024)]["iops"] == 0.5
    assert ("tcmu-py-file/tcmu-runner-qcow", 128) not in got  # no tcmu-py case at 128


def test_parse_rows_reads_rows_and_merges_info(guest: ModuleType) -> None:
    lines = ['BENCH-INFO {"a": 1}', "[ 1.0s] a human line", 'BENCH-ROW {"iops": 5}\r\n',
             'BENCH-INFO {"b": 2}']
    rows, info = guest.parse_rows(lines)
    assert rows == [{"iops": 5}]
    assert info == {"a": 1, "b": 2}


def test_summarize_profile_reads_one_thread_and_its_idle_share(guest: ModuleType) -> None:
    raw = "\n".join([
        "thread (1): MainThread;main (cli.py:1);select;epoll_wait (libc.so.6) 60",
        "thread (1): MainThread;main (cli.py:1);flush;write (libc.so.6) 30",
        "thread (1): MainThread;main (cli.py:1);drain (ring.py:2) 10",
        "thread (7): asyncio_0;_worker;epoll_wait (libc.so.6) 500",  # another thread: not counted
        "garbage line",
    ])
    s = guest.summarize_profile(raw)
    assert s["samples"] == 100
    assert s["idle"] == pytest.approx(0.6)
    assert s["stacks"] == [("write (libc.so.6) <- flush <- main (cli.py:1)", 0.3),
                           ("drain (ring.py:2) <- main (cli.py:1)", 0.1)]
    assert guest.summarize_profile("")["idle"] is None
