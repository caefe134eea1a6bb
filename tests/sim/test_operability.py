"""Operability on the simulated kernel: per-device counters are exact for a known
workload, whichever path served it (the native C path for ram/file, or Python), and
the status socket and ``tcmu-py status`` work against a live engine."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcmu_py.metrics import device_snapshot
from tcmu_py.prometheus import MetricsServer
from tcmu_py.sim import SimTarget
from tcmu_py.status import StatusError, StatusServer, query
from tcmu_py_handlers.file import FileHandler
from tcmu_py_handlers.ram import RamHandler

BS = 512
SIZE = 1 << 20
NUM_LBAS = SIZE // BS


def rw16(op: int, lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", op, 0, lba, n, 0, 0)


class FlakyRam(RamHandler):
    """A ram disk whose block 1000 cannot be read (EIO -> MEDIUM ERROR); it replaces
    ``read``, so the native path stays off for it."""

    subtype = "flakyram"

    def read(self, offset: int, length: int, bufs: Any) -> None:
        if offset <= 1000 * BS < offset + length:
            raise OSError(5, "bad block")
        super().read(offset, length, bufs)


def _snap(t: SimTarget) -> dict[str, Any]:
    return t._lt.call(device_snapshot, t.device)


def _workload(t: SimTarget) -> None:
    """10 writes and 20 reads of 4 KiB, 3 flushes, 2 TEST UNIT READY, 1 INQUIRY (36 bytes),
    then 2 READs past the end and 1 unknown opcode (ILLEGAL REQUEST)."""
    data = os.urandom(8 * BS)
    for i in range(10):
        assert t.submit(rw16(0x8A, i * 8, 8), data).status == 0
    for i in range(20):
        res = t.submit(rw16(0x88, (i % 10) * 8, 8), None, 8 * BS)
        assert (res.status, res.data) == (0, data)
    for _ in range(3):
        assert t.submit(struct.pack(">BBQIBB", 0x91, 0, 0, 0, 0, 0)).status == 0
    for _ in range(2):
        assert t.submit(bytes(6)).status == 0
    assert t.submit(bytes([0x12, 0, 0, 0, 36, 0]), None, 36).status == 0
    for _ in range(2):
        assert t.submit(rw16(0x88, NUM_LBAS, 8), None, 8 * BS).status == 2
    assert t.submit(bytes([0xC7, 0, 0, 0, 0, 0]), None, 0).status == 2


def _check_workload(s: dict[str, Any]) -> None:
    assert s["commands"] == {"read": 22, "write": 10, "flush": 3, "unmap": 0, "other": 4}
    assert s["bytes"] == {"read": 22 * 4096, "write": 10 * 4096, "flush": 0, "unmap": 0,
                          "other": 36}
    assert s["commands_total"] == 39
    assert s["errors"] == {"illegal_request": 3}
    assert s["errors_total"] == 3
    # every command is timed exactly once, from its fetch to its completion
    assert sum(s["latency_hist_log2_us"]) == 39
    assert 0 < s["latency_p50_us"] <= s["latency_p99_us"]
    assert s["inflight"] == 0
    assert s["inflight_peak"] == 1  # one command at a time
    assert (s["ring_full"], s["qfull"], s["recoveries"]) == (0, 0, 0)
    assert s["state"] == "running"


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_ram_counters_are_exact_with_and_without_the_native_path(native: bool) -> None:
    with SimTarget(RamHandler, "ram/", size=SIZE) as t:
        if not native:
            t._lt.call(t.device.native_release)
        _workload(t)
        s = _snap(t)
        _check_workload(s)
        assert s["native"] is native
        assert (s["name"], s["handler"], s["config"], s["size"]) == ("sim0", "ram", "ram/", SIZE)
        native_reads, native_writes, _, _ = t._lt.call(t.device.ring.native_counts)
        # the native path really served the plain reads and writes (and only then)
        assert (native_reads, native_writes) == ((20, 10) if native else (0, 0))


@pytest.mark.parametrize("native", [True, False], ids=["native-fd", "python-threads"])
def test_file_counters_are_exact_with_and_without_the_native_path(
        native: bool, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with SimTarget(FileHandler, f"file/{img}", size=SIZE) as t:
        if not native:
            t._lt.call(t.device.native_release)
        assert t.device.native is native
        _workload(t)
        s = _snap(t)
        _check_workload(s)
        assert s["handler"] == "file"


def test_errors_are_counted_by_sense_key_and_busy_as_back_pressure() -> None:
    with SimTarget(FlakyRam, "flakyram/", size=SIZE) as t:
        assert not t.device.native
        res = t.submit(rw16(0x88, 996, 8), None, 8 * BS)
        assert res.status == 2 and res.sense[2] & 0xF == 0x3  # MEDIUM ERROR
        t._lt.call(setattr, t.device, "blocked", True)  # as during a recovery
        assert t.submit(rw16(0x88, 0, 8), None, 8 * BS).status == 0x08  # BUSY
        t._lt.call(setattr, t.device, "blocked", False)
        assert t.submit(rw16(0x88, 0, 8), None, 8 * BS).status == 0
        s = _snap(t)
        assert s["errors"] == {"medium_error": 1, "busy": 1}
        assert s["qfull"] == 1
        assert s["commands"]["read"] == 3
        assert s["state"] == "running"


def test_a_full_command_ring_is_counted() -> None:
    with SimTarget(FileHandler, "file/" + os.path.join("/dev/shm", f"ops-{os.getpid()}.img"),
                   size=SIZE, cmdr_size=4096) as t:
        try:
            t._lt.call(t.device.native_release)
            futs = [t.submit_nowait(rw16(0x88, i % NUM_LBAS, 1), None, BS) for i in range(400)]
            assert all(f.result(30).status == 0 for f in futs)
            s = _snap(t)
            assert t.kernel.stats["ring_full"] > 0
            assert s["ring_full"] > 0
            assert s["commands"]["read"] == 400
            assert sum(s["latency_hist_log2_us"]) == 400
            assert 1 < s["inflight_peak"] <= 400
        finally:
            os.unlink(os.path.join("/dev/shm", f"ops-{os.getpid()}.img"))


def test_no_metrics_leaves_the_counts_empty_but_serves() -> None:
    with SimTarget(RamHandler, "ram/", size=SIZE) as t:
        t._lt.call(t.device.native_release)
        t._lt.call(setattr, t.device, "metrics", None)
        assert t.submit(rw16(0x88, 0, 8), None, 8 * BS).status == 0
        s = _snap(t)
        assert s["metrics"] is False
        assert s["commands_total"] == 0


# -- the status socket, `tcmu-py status` and the metrics endpoint, against a live engine --

def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tcmu_py.status_cli", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[SimTarget, str]]:
    sock = str(tmp_path / "run" / "status.sock")
    with SimTarget(RamHandler, "ram/", size=SIZE) as t:
        server = StatusServer(t.engine, sock)
        t._lt.run(server.start())
        try:
            yield t, sock
        finally:
            t._lt.run(server.stop())


def test_the_status_socket_is_root_only_and_answers_with_every_device(
        served: tuple[SimTarget, str]) -> None:
    t, sock = served
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    _workload(t)
    reply = query(sock)
    assert reply["version"] == 1 and reply["pid"] == os.getpid()
    [dev] = reply["devices"]
    _check_workload(dev)


def test_tcmu_py_status_reports_the_rate_of_a_running_workload(
        served: tuple[SimTarget, str]) -> None:
    t, sock = served
    stop = threading.Event()
    done = [0]

    def load() -> None:
        while not stop.is_set():
            assert t.submit(rw16(0x88, 0, 8), None, 8 * BS).status == 0
            done[0] += 1

    th = threading.Thread(target=load)
    th.start()
    try:
        time.sleep(0.3)
        n0, t0 = done[0], time.monotonic()
        res = _cli("status", "--json", "--interval", "1", "--socket", sock)
        rate = (done[0] - n0) / (time.monotonic() - t0)
    finally:
        stop.set()
        th.join(10)
    assert res.returncode == 0, res.stderr
    [dev] = json.loads(res.stdout)["devices"]
    assert dev["name"] == "sim0" and dev["handler"] == "ram"
    assert 0.5 * rate < dev["iops"] < 2 * rate
    assert dev["mb_s"] == pytest.approx(dev["iops"] * 4096 / 1e6, rel=0.01)
    assert dev["interval_p50_us"] is not None
    table = _cli("status", "--interval", "0.2", "--socket", sock)
    assert table.returncode == 0, table.stderr
    head, line = table.stdout.splitlines()[:2]
    assert head.split()[:5] == ["DEVICE", "HANDLER", "CONFIG", "SIZE", "STATE"]
    assert line.split()[:5] == ["sim0", "ram", "ram/", "1M", "running"]
    watch = _cli("status", "--json", "--watch", "0.2", "--count", "2", "--socket", sock)
    assert watch.returncode == 0, watch.stderr
    assert len([json.loads(x) for x in watch.stdout.splitlines()]) == 2


def test_tcmu_py_status_says_no_daemon_runs_and_exits_3(tmp_path: Path) -> None:
    res = _cli("status", "--socket", str(tmp_path / "none.sock"))
    assert res.returncode == 3
    assert res.stdout == ""
    assert res.stderr.strip() == (f"tcmu-py: no tcmu-py-runner is running (nothing answers on "
                                  f"{tmp_path / 'none.sock'})")


def test_a_second_server_does_not_take_a_live_socket(served: tuple[SimTarget, str]) -> None:
    t, sock = served
    with pytest.raises(StatusError, match="another runner already answers"):
        t._lt.run(StatusServer(t.engine, sock).start())
    assert query(sock)["devices"][0]["name"] == "sim0"  # the first one still serves


def test_a_dead_runners_socket_is_replaced(tmp_path: Path) -> None:
    sock = str(tmp_path / "status.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock)  # bound, never listening: what a killed runner leaves
    s.close()
    with SimTarget(RamHandler, "ram/", size=SIZE) as t:
        server = StatusServer(t.engine, sock)
        t._lt.run(server.start())
        try:
            assert query(sock)["devices"][0]["name"] == "sim0"
        finally:
            t._lt.run(server.stop())
    assert not os.path.exists(sock)


def test_the_metrics_endpoint_serves_parseable_counters() -> None:
    with SimTarget(RamHandler, "ram/", size=SIZE) as t:
        _workload(t)
        server = MetricsServer(t.engine, "127.0.0.1:0")
        t._lt.run(server.start())
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = r.read().decode()
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=10)
        finally:
            t._lt.run(server.stop())
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    got = {s.labels["kind"]: s.value for s in fams["tcmu_py_device_commands"].samples
           if s.name == "tcmu_py_device_commands_total" and s.labels["device"] == "sim0"}
    assert got == {"read": 22, "write": 10, "flush": 3, "unmap": 0, "other": 4}
    errs = {s.labels["reason"]: s.value for s in fams["tcmu_py_device_errors"].samples}
    assert errs == {"illegal_request": 3}
    count = [s.value for s in fams["tcmu_py_device_latency_seconds"].samples
             if s.name == "tcmu_py_device_latency_seconds_count"]
    assert count == [39]


def test_the_runner_refuses_a_remote_metrics_address_before_starting(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "tcmu_py.cli", "--metrics-listen", "0.0.0.0:9560",
                          "--lock-file", str(tmp_path / "lock"), "--config", str(tmp_path / "c"),
                          "-l", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert "not a loopback address" in res.stderr and "--metrics-allow-remote" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("native", [True, False], ids=["native", "python-inline"])
def test_a_full_ring_is_seen_before_the_batch_completes_it(native: bool) -> None:
    # inline handlers complete the whole batch at once: the ring must be looked at before
    with SimTarget(RamHandler, "ram/", size=SIZE, cmdr_size=4096) as t:
        if not native:
            t._lt.call(t.device.native_release)
        futs = [t.submit_nowait(rw16(0x88, i % NUM_LBAS, 1), None, BS) for i in range(400)]
        assert all(f.result(30).status == 0 for f in futs)
        s = _snap(t)
        assert t.kernel.stats["ring_full"] > 0
        assert s["ring_full"] > 0
        assert s["commands"]["read"] == 400 and sum(s["latency_hist_log2_us"]) == 400
