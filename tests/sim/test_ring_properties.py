"""Property tests: random interleavings of submissions, sizes and out-of-order
completions never lose, duplicate or corrupt a command or its data; random bytes in
the ring never crash the process."""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_py import abi
from tcmu_py.ring import Command, MalformedEntry, Ring, TmrEntry
from tcmu_py.sim.kernel import SimKernel

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(1, 40)),
        st.tuples(st.just("write"), st.integers(1, 40)),
        st.tuples(st.just("complete"), st.integers(0, 2**32)),
        st.tuples(st.just("drain"), st.just(0)),
    ),
    min_size=1,
    max_size=120,
)


def _pattern(tag: int, n: int) -> bytes:
    rnd = random.Random(tag)
    return rnd.randbytes(n)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, cmdr=st.sampled_from([4096, 4104, 8192]), data_kb=st.sampled_from([32, 64, 256]))
def test_no_command_is_lost_duplicated_or_corrupted(ops, cmdr, data_kb):
    k = SimKernel(cmdr_size=cmdr, data_size=data_kb * 1024)
    ring = Ring(k.user_fd, k.map_size, map_fd=k.memfd)
    results: dict[int, list] = {}
    expected: dict[int, tuple[str, bytes]] = {}
    fetched: list[tuple[int, Command]] = []
    seen_write: dict[int, bytes] = {}
    tag_of: dict[int, int] = {}  # cmd_id -> tag for in-flight commands
    try:
        for i, (op, arg) in enumerate(ops):
            if op in ("read", "write"):
                n = arg * 512
                if n > k.data_size:
                    continue
                tag = i
                # the tag rides in the CDB's LBA so the runner can tell commands apart
                if op == "read":
                    cdb = struct.pack(">BBIBHB", 0x28, 0, tag, 0, arg, 0)
                    expected[tag] = ("read", _pattern(tag, n))
                    k.queue(cdb, None, n, lambda r, t=tag: results.setdefault(t, []).append(r))
                else:
                    data = _pattern(tag, n)
                    cdb = struct.pack(">BBIBHB", 0x2A, 0, tag, 0, arg, 0)
                    expected[tag] = ("write", data)
                    k.queue(cdb, data, 0, lambda r, t=tag: results.setdefault(t, []).append(r))
            elif op == "drain":
                for ent in ring.drain():
                    assert isinstance(ent, Command)
                    tag = struct.unpack_from(">I", ent.cdb, 2)[0]
                    assert ent.cmd_id not in tag_of
                    tag_of[ent.cmd_id] = tag
                    kind, data = expected[tag]
                    if kind == "read":
                        pos = 0
                        for v in ent.iov:
                            v[:] = data[pos : pos + len(v)]
                            pos += len(v)
                        assert pos == len(data)
                    else:
                        seen_write[tag] = b"".join(bytes(v) for v in ent.iov)
                    fetched.append((tag, ent))
            elif fetched:
                # complete a random in-flight command (out of order)
                j = arg % len(fetched)
                tag, cmd = fetched.pop(j)
                del tag_of[cmd.cmd_id]
                ring.complete(cmd.cmd_id, 0)
                ring.flush()
                k.irqcontrol()
        # finish everything
        for _ in range(1000):
            for ent in ring.drain():
                tag = struct.unpack_from(">I", ent.cdb, 2)[0]
                kind, data = expected[tag]
                if kind == "read":
                    pos = 0
                    for v in ent.iov:
                        v[:] = data[pos : pos + len(v)]
                        pos += len(v)
                else:
                    seen_write[tag] = b"".join(bytes(v) for v in ent.iov)
                fetched.append((tag, ent))
            if not fetched:
                break
            random.Random(len(fetched)).shuffle(fetched)
            for _tag, cmd in fetched:
                ring.complete(cmd.cmd_id, 0)
            fetched.clear()
            ring.flush()
            k.irqcontrol()
        assert not k.broken
        assert set(results) == set(expected)
        for tag, (kind, data) in expected.items():
            assert len(results[tag]) == 1, f"command {tag} completed {len(results[tag])} times"
            r = results[tag][0]
            assert r.status == 0
            if kind == "read":
                assert r.data == data
            else:
                assert seen_write[tag] == data
        assert k.free_block_count == k.nblocks
    finally:
        ring.close()
        k.close()


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=8),
       words=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2**32 - 1)), max_size=12))
def test_random_ring_bytes_never_crash_the_runner(entries, words):
    k = SimKernel(cmdr_size=4096, data_size=64 * 1024)
    ring = Ring(k.user_fd, k.map_size, map_fd=k.memfd)
    try:
        for raw in entries:
            buf = bytearray(raw) + bytes(max(0, 8 - len(raw)))
            for off, val in words:  # plant plausible headers / offsets / lengths
                if off * 4 + 4 <= len(buf):
                    struct.pack_into("<I", buf, off * 4, val)
            if k.head + len(buf) > k.cmdr_size:
                break
            k.write_raw_entry(bytes(buf))
        for ent in ring.drain():
            assert isinstance(ent, Command | TmrEntry | MalformedEntry)
            if isinstance(ent, Command):
                for v in ent.iov:  # every view must be inside the mapping
                    assert len(v) <= k.map_size
                    v[:1] = b"\x00" if len(v) else b""
        # the ring can always be recovered by a reset
        k.reset_ring(1)
        ring.reset()
        k.queue(bytes([0, 0, 0, 0, 0, 0]), None, 0, lambda r: None)
        got = ring.drain()
        assert len(got) == 1 and isinstance(got[0], Command)
        assert ring.corrupt is None
    finally:
        ring.close()
        k.close()


def test_shim_bounds_check_reports_each_reason():
    k = SimKernel(cmdr_size=4096, data_size=64 * 1024)
    ring = Ring(k.user_fd, k.map_size, map_fd=k.memfd)
    try:
        base = abi.CMDR_OFF
        # iov count larger than the entry can hold
        raw = bytearray(112)
        abi.HDR.pack_into(raw, 0, 112 | abi.OP_CMD, 1, 0, 0)
        struct.pack_into("<I", raw, 8, 1000)
        k.write_raw_entry(bytes(raw))
        (m,) = ring.drain()
        assert isinstance(m, MalformedEntry) and "iovec count" in m.reason
        # CDB that runs past the entry: cdb_off at the last byte, 16-byte opcode
        raw = bytearray(120)
        abi.HDR.pack_into(raw, 0, 120 | abi.OP_CMD, 2, 0, 0)
        ent_abs = base + k.head
        struct.pack_into("<Q", raw, 24, ent_abs + 119)
        raw[119] = 0x88
        k.write_raw_entry(bytes(raw))
        (m,) = ring.drain()
        assert isinstance(m, MalformedEntry) and "CDB" in m.reason
    finally:
        ring.close()
        k.close()
