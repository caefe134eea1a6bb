"""Per-device counters kept cheap enough for the hot path, and their snapshots.

The engine owns one :class:`DeviceMetrics` per device and touches only plain ints and
lists of ints on the data path: per command an opcode's count and bytes (two list
increments), per batch one clock read, one histogram increment for every command the
batch completed in the loop, and the in-flight peak.  Everything that costs more --
folding opcodes into kinds, sense keys into names, percentiles, adding what the native
path (C) counted -- happens in :func:`device_snapshot`, when someone asks.

Latency is "ring fetch to completion" in log2-microsecond buckets, the same 32 buckets
the C path keeps: bucket ``b`` holds latencies in [2^(b-1), 2^b) µs (bucket 0: under
1 µs, bucket 31: 2^30 µs and more).  A command the loop thread completes inside the
batch that fetched it gets the batch's time (its completion reaches the kernel at the
batch's one flush); one handed to worker threads or an async handler is timed when its
result comes back.
"""

from __future__ import annotations

import time
from typing import Any

from tcmu_py.scsi._model import Sam, SenseKey

__all__ = [
    "HIST_BUCKETS",
    "KINDS",
    "DeviceMetrics",
    "bucket_of",
    "bucket_upper_us",
    "device_snapshot",
    "percentile_us",
    "sense_key_of",
]

HIST_BUCKETS = 32  # TCMU_PY_HIST in native/tcmu_shim.h
KINDS = ("read", "write", "flush", "unmap", "other")

_READ_OPS = (0x08, 0x28, 0xA8, 0x88)
#: WRITE, WRITE AND VERIFY, WRITE SAME, COMPARE AND WRITE: they change the medium
_WRITE_OPS = (0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x41, 0x93, 0x89)
_FLUSH_OPS = (0x35, 0x91)
_UNMAP_OPS = (0x42,)


def _kind_table() -> list[int]:
    t = [KINDS.index("other")] * 256
    for kind, ops in (("read", _READ_OPS), ("write", _WRITE_OPS), ("flush", _FLUSH_OPS),
                      ("unmap", _UNMAP_OPS)):
        for op in ops:
            t[op] = KINDS.index(kind)
    return t


#: opcode -> index in KINDS
KIND_OF_OP = _kind_table()

_SENSE_NAMES = {k.value: k.name.lower() for k in SenseKey}
_STATUS_NAMES = {s.value: s.name.lower() for s in Sam}


def bucket_of(us: int) -> int:
    """The log2 bucket of a latency in whole microseconds (as the C path computes it)."""
    b = us.bit_length()
    return b if b < HIST_BUCKETS else HIST_BUCKETS - 1


def bucket_upper_us(b: int) -> float:
    """The exclusive upper bound of bucket ``b`` in µs (inf for the last one)."""
    return float("inf") if b >= HIST_BUCKETS - 1 else float(1 << b)


def percentile_us(hist: list[int], p: float) -> float | None:
    """The ``p``-th percentile (0..100) of a log2-µs histogram, interpolated linearly in
    its bucket; None for an empty histogram.  The true value lies in the same bucket, so
    the error is below a factor of two."""
    total = sum(hist)
    if not total:
        return None
    rank = max(1.0, p / 100.0 * total)
    seen = 0
    for b, n in enumerate(hist):
        if not n:
            continue
        if seen + n >= rank:
            lo = 0.0 if b == 0 else float(1 << (b - 1))
            hi = float(1 << b) if b < HIST_BUCKETS - 1 else lo * 2
            return lo + (hi - lo) * (rank - seen) / n
        seen += n
    return None  # unreachable: rank <= total


def sense_key_of(sense: bytes) -> int | None:
    """The sense key of fixed (70h/71h) or descriptor (72h/73h) format sense data."""
    if len(sense) < 3:
        return None
    code = sense[0] & 0x7F
    if code in (0x70, 0x71):
        return sense[2] & 0x0F
    if code in (0x72, 0x73):
        return sense[1] & 0x0F
    return None


class DeviceMetrics:
    """The Python side's counters of one device.  Only the loop thread writes them."""

    __slots__ = (
        "errors_by_key", "errors_by_status", "hist", "inflight_peak", "op_bytes", "ops",
        "qfull", "ring_full", "started",
    )

    def __init__(self) -> None:
        self.ops = [0] * 256  # commands fetched, per opcode
        self.op_bytes = [0] * 256  # their data-out/data-in buffer lengths
        self.errors_by_key = [0] * 16  # CHECK CONDITION answers, per sense key
        self.errors_by_status: dict[int, int] = {}  # other non-GOOD statuses (BUSY, ...)
        self.hist = [0] * HIST_BUCKETS  # fetch-to-completion latency, log2 µs
        self.inflight_peak = 0
        self.ring_full = 0  # drains that found the command ring (nearly) full
        self.qfull = 0  # commands answered BUSY / TASK SET FULL (back-pressure)
        self.started = time.time()

    def error(self, status: int, sense: bytes) -> None:
        """Count one non-GOOD completion (errors are rare: a dict is fine here)."""
        if status == Sam.CHECK_CONDITION:
            key = sense_key_of(sense)
            if key is not None:
                self.errors_by_key[key] += 1
                return
        elif status in (Sam.BUSY, Sam.TASK_SET_FULL):
            self.qfull += 1
        self.errors_by_status[status] = self.errors_by_status.get(status, 0) + 1


def _fold(per_op: list[int]) -> dict[str, int]:
    out = dict.fromkeys(KINDS, 0)
    kind_of = KIND_OF_OP
    for op, n in enumerate(per_op):
        if n:
            out[KINDS[kind_of[op]]] += n
    return out


def device_snapshot(dev: Any) -> dict[str, Any]:
    """Everything known about one engine Device as plain JSON-able values.

    Counts of the native data path (READ/WRITE served in C, ``Ring.native_counts``) are
    added to the Python side's, so the figures are the device's, whichever path served.
    Must run in the loop thread (it reads the ring's counters)."""
    st = dev.state
    ring = dev.ring
    mt: DeviceMetrics | None = dev.metrics
    commands = dict.fromkeys(KINDS, 0)
    nbytes = dict.fromkeys(KINDS, 0)
    hist = [0] * HIST_BUCKETS
    errors: dict[str, int] = {}
    ring_full = qfull = peak = 0
    if mt is not None:
        commands = _fold(mt.ops)
        nbytes = _fold(mt.op_bytes)
        hist = list(mt.hist)
        for key, n in enumerate(mt.errors_by_key):
            if n:
                errors[_SENSE_NAMES.get(key, f"sense_key_{key:x}")] = n
        for status, n in mt.errors_by_status.items():
            name = _STATUS_NAMES.get(status, f"status_{status:02x}")
            errors[name] = errors.get(name, 0) + n
        ring_full, qfull, peak = mt.ring_full, mt.qfull, mt.inflight_peak
    reads, writes, rbytes, wbytes = ring.native_counts()
    commands["read"] += reads
    commands["write"] += writes
    nbytes["read"] += rbytes
    nbytes["write"] += wbytes
    for b, n in enumerate(ring.native_latency_histogram()):
        hist[b] += n
    inflight = len(dev.inflight) + ring.native_inflight
    if dev.recovering:
        state = "recovering"
    elif dev.closing:
        state = "closing"
    elif dev.blocked:
        state = "blocked"
    else:
        state = "running"
    return {
        "name": dev.name,
        "handler": getattr(type(dev.handler), "subtype", type(dev.handler).__name__),
        "config": st.cfgstring,
        "size": st.num_lbas * st.block_size,
        "block_size": st.block_size,
        "state": state,
        "native": bool(dev.native),
        "metrics": mt is not None,
        "commands": commands,
        "bytes": nbytes,
        "commands_total": sum(commands.values()),
        "errors": errors,
        "errors_total": sum(errors.values()),
        "inflight": inflight,
        "inflight_peak": max(peak, inflight),
        "latency_hist_log2_us": hist,
        "latency_p50_us": percentile_us(hist, 50),
        "latency_p99_us": percentile_us(hist, 99),
        "ring_full": ring_full,
        "qfull": qfull,
        "recoveries": dev.counters["recoveries"],
        "timeouts": dev.counters["timeouts"],
        "tmr": dev.counters["tmr"],
        "malformed": dev.counters["malformed"],
        "batches": dev.counters["batches"],
        "since": mt.started if mt is not None else None,
    }
