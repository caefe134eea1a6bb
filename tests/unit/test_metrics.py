"""Metrics arithmetic and the Prometheus text: log2 buckets as the C path computes them,
percentiles from a histogram, and an exposition that prometheus_client's parser reads."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcmu_py.logs import Formatter, RateLimit, device_logger
from tcmu_py.metrics import (
    HIST_BUCKETS,
    KINDS,
    DeviceMetrics,
    bucket_of,
    percentile_us,
    sense_key_of,
)
from tcmu_py.prometheus import ListenError, parse_listen, render


def test_log2_buckets_match_the_native_paths() -> None:
    # C: us ? 64 - clzll(us) : 0, capped at 31
    assert [bucket_of(us) for us in (0, 1, 2, 3, 4, 7, 8, 1000)] == [0, 1, 2, 2, 3, 3, 4, 10]
    assert bucket_of(1 << 40) == HIST_BUCKETS - 1


def test_percentiles_fall_in_the_right_bucket() -> None:
    hist = [0] * HIST_BUCKETS
    assert percentile_us(hist, 50) is None
    hist[bucket_of(100)] = 90  # 64..128 µs
    hist[bucket_of(5000)] = 10  # 4096..8192 µs
    p50 = percentile_us(hist, 50)
    p99 = percentile_us(hist, 99)
    assert p50 is not None and 64 <= p50 < 128
    assert p99 is not None and 4096 <= p99 < 8192
    assert percentile_us(hist, 90) == pytest.approx(128.0)


def test_sense_keys_are_read_from_fixed_and_descriptor_format() -> None:
    assert sense_key_of(bytes([0x70, 0, 0x05]) + bytes(15)) == 5
    assert sense_key_of(bytes([0x72, 0x03, 0x11, 0])) == 3
    assert sense_key_of(b"") is None


def test_errors_split_into_sense_keys_and_back_pressure() -> None:
    m = DeviceMetrics()
    m.error(0x02, bytes([0x70, 0, 0x03]) + bytes(15))
    m.error(0x08, b"")
    m.error(0x28, b"")
    m.error(0x18, b"")
    assert m.errors_by_key[3] == 1
    assert m.qfull == 2
    assert m.errors_by_status == {0x08: 1, 0x28: 1, 0x18: 1}


def _dev(name: str, **kw: Any) -> dict[str, Any]:
    hist = [0] * HIST_BUCKETS
    hist[5] = 7
    hist[12] = 3
    d = {
        "name": name, "handler": "rbd", "config": 'rbd/pool/img;id="x"\n', "size": 1 << 30,
        "state": "running", "native": False,
        "commands": dict(zip(KINDS, (5, 4, 1, 0, 0), strict=True)),
        "bytes": dict(zip(KINDS, (5 * 4096, 4 * 4096, 0, 0, 0), strict=True)),
        "errors": {"medium_error": 2, "busy": 1}, "inflight": 2, "inflight_peak": 9,
        "ring_full": 1, "qfull": 1, "recoveries": 3, "timeouts": 0,
        "latency_hist_log2_us": hist,
    }
    d.update(kw)
    return d


def test_the_exposition_parses_with_prometheus_client_and_follows_the_conventions() -> None:
    text = render({"uptime_s": 12.5, "devices": [_dev("a", lock_owner=True), _dev("b")]})
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    cmds = fams["tcmu_py_device_commands"]
    assert cmds.type == "counter"
    got = {(s.labels["device"], s.labels["kind"]): s.value for s in cmds.samples
           if s.name == "tcmu_py_device_commands_total"}
    assert got[("a", "read")] == 5 and got[("b", "write")] == 4
    assert all(s.labels["handler"] == "rbd" for s in cmds.samples)
    errs = {(s.labels["device"], s.labels["reason"]): s.value
            for s in fams["tcmu_py_device_errors"].samples}
    assert errs[("a", "medium_error")] == 2 and errs[("b", "busy")] == 1
    info = next(s for s in fams["tcmu_py_device_info"].samples if s.labels["device"] == "a")
    assert info.labels["config"] == 'rbd/pool/img;id="x"\n'  # escaped and read back
    lat = fams["tcmu_py_device_latency_seconds"]
    assert lat.type == "histogram"
    a = [s for s in lat.samples if s.labels.get("device") == "a"]
    count = [s.value for s in a if s.name.endswith("_count")]
    assert count == [10]
    buckets = [(float(s.labels["le"]), s.value) for s in a if s.name.endswith("_bucket")]
    assert buckets[-1] == (math.inf, 10)
    assert dict(buckets)[2 ** 5 * 1e-6] == 7  # bucket 5: 16..32 µs, le=32 µs
    assert [s.value for s in fams["tcmu_py_device_lock_owner"].samples] == [1]
    for name in ("tcmu_py_device_ring_full", "tcmu_py_device_qfull",
                 "tcmu_py_device_recoveries", "tcmu_py_device_bytes"):
        assert fams[name].type == "counter"
    assert fams["tcmu_py_device_inflight_commands"].samples[0].value == 2
    assert fams["tcmu_py_runner_uptime_seconds"].samples[0].value == 12.5


@pytest.mark.parametrize("spec,want", [
    ("127.0.0.1:9560", ("tcp", "127.0.0.1", 9560)),
    ("localhost:1", ("tcp", "localhost", 1)),
    ("[::1]:9560", ("tcp", "::1", 9560)),
    ("unix:/run/x.sock", ("unix", "/run/x.sock", 0)),
])
def test_loopback_and_unix_listeners_are_accepted(spec: str, want: tuple[str, str, int]) -> None:
    assert parse_listen(spec) == want


@pytest.mark.parametrize("spec", ["0.0.0.0:9560", "10.1.2.3:9560", "example.org:80", "[::]:1"])
def test_a_non_loopback_listener_needs_the_explicit_flag(spec: str) -> None:
    with pytest.raises(ListenError, match="loopback"):
        parse_listen(spec)
    assert parse_listen(spec, allow_remote=True)[0] == "tcp"


@pytest.mark.parametrize("spec", ["9560", "127.0.0.1:x", "unix:", "127.0.0.1:70000"])
def test_a_malformed_listener_is_one_clear_error(spec: str) -> None:
    with pytest.raises(ListenError, match="--metrics-listen"):
        parse_listen(spec)


def _record(msg: str, device: str | None = "d0", level: int = logging.ERROR) -> logging.LogRecord:
    r = logging.LogRecord("tcmu_py.engine", level, __file__, 1, msg, (), None)
    if device is not None:
        r.device, r.handler = device, "ram"
    return r


def test_repeats_are_rate_limited_per_device_and_the_drop_is_reported() -> None:
    rl = RateLimit(burst=2, interval=3600)
    assert [rl.filter(_record("boom %s")) for _ in range(5)] == [True, True, False, False, False]
    assert rl.filter(_record("boom %s", device="d1"))  # another device's story
    assert rl.filter(_record("other"))
    assert all(rl.filter(_record("dbg", level=logging.DEBUG)) for _ in range(10))
    rl.interval = 0.0  # the window is over: the next one says what was dropped
    r = _record("boom %s")
    assert rl.filter(r)
    text = Formatter("%(message)s%(fields)s").format(r)
    assert text == "boom %s [device=d0 handler=ram] (3 similar message(s) suppressed)"


def test_device_loggers_carry_device_and_handler_fields() -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    lg = logging.getLogger("tcmu_py.test_fields")
    lg.addHandler(Keep())
    lg.propagate = False
    device_logger(lg, "disk7", "file").warning("hello %d", 1)
    assert (records[0].device, records[0].handler) == ("disk7", "file")  # type: ignore[attr-defined]
    assert Formatter("%(message)s%(fields)s").format(records[0]) == \
        "hello 1 [device=disk7 handler=file]"
