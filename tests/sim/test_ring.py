"""Byte-level behaviour of the ring protocol (reference/tcmu.md §1.4-1.11), exercised
through the production Ring + native shim against the simulated kernel."""

from __future__ import annotations

import struct

from tcmu_py import abi
from tcmu_py.ring import Command, MalformedEntry, TmrEntry


def read10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, n, 0)


def read16(lba: int, n: int) -> bytes:
    return struct.pack(">BBQIBB", 0x88, 0, lba, n, 0, 0)


def write10(lba: int, n: int) -> bytes:
    return struct.pack(">BBIBHB", 0x2A, 0, lba, 0, n, 0)


def fill(cmd: Command, byte: int) -> None:
    for v in cmd.iov:
        v[:] = bytes([byte]) * len(v)


def test_mailbox_is_version_2_with_all_cap_flags(pair):
    mm = pair.kernel.mm
    version, flags, cmdr_off, cmdr_size = struct.unpack_from("<HHII", mm, 0)
    assert (version, cmdr_off, cmdr_size) == (2, 128, 4096)
    assert flags == abi.MB_FLAGS_ALL
    assert pair.ring.cmdr_size == 4096
    assert pair.ring.data_off == 128 + 4096


def test_read_data_reaches_kernel_through_zero_copy_views(pair):
    pair.submit(read10(0, 8), data_in_len=4096, tag=1)
    (cmd,) = pair.ring.drain()
    assert isinstance(cmd, Command) and cmd.cdb == read10(0, 8)
    assert cmd.data_len == 4096 and len(cmd.iov) == 1
    # the view points straight into the kernel's data area
    cmd.iov[0][:4] = b"\xde\xad\xbe\xef"
    off = pair.ring.data_off
    assert bytes(pair.kernel.mm[off : off + 4]) == b"\xde\xad\xbe\xef"
    fill(cmd, 0x5A)
    pair.ring.complete(cmd.cmd_id, 0)
    assert pair.ring.flush()
    pair.kernel.irqcontrol()
    res = pair.results[1]
    assert res.status == 0 and res.data == b"\x5a" * 4096


def test_write_data_is_visible_to_the_runner(pair):
    payload = bytes(range(256)) * 16
    pair.submit(write10(3, 8), data_out=payload, tag=1)
    (cmd,) = pair.ring.drain()
    assert b"".join(bytes(v) for v in cmd.iov) == payload


def test_entries_never_wrap_a_pad_fills_the_ring_end(make_pair):
    """§1.7: a command that does not fit before the ring end is preceded by a PAD."""
    pair = make_pair(cmdr_size=4104, data_size=256 * 1024)  # not a multiple of 128
    ring, kernel = pair.ring, pair.kernel
    seen_pad = False
    for i in range(200):
        head_before = kernel.head
        pair.submit(read16(i, 1), data_in_len=512, tag=i)
        if kernel.head < head_before and head_before != 0:
            len_op, _cmd_id, _, _ = abi.HDR.unpack_from(kernel.mm, abi.CMDR_OFF + head_before)
            assert abi.hdr_get_op(len_op) == abi.OP_PAD
            assert abi.hdr_get_len(len_op) == kernel.cmdr_size - head_before
            seen_pad = True
        for c in ring.drain():
            fill(c, i & 0xFF)
            ring.complete(c.cmd_id, 0)
        ring.flush()
        kernel.irqcontrol()
        assert pair.results[i].data == bytes([i & 0xFF]) * 512
    assert seen_pad


def test_one_byte_of_the_ring_is_always_left_free(make_pair):
    """§1.7 spc_free: the kernel never fills the ring completely (head == tail means empty)."""
    p = make_pair(cmdr_size=4096, data_size=1024 * 1024)
    # each READ10 with one iovec is 112 + 16 = 128 bytes; 4096/128 = 32 would fill it exactly
    for i in range(32):
        p.submit(read10(i, 1), data_in_len=512, tag=i)
    assert len(p.kernel.qfull) == 1  # the 32nd would leave 0 bytes free
    assert p.kernel.head == 31 * 128
    cmds = p.ring.drain()
    assert len(cmds) == 31
    for c in cmds:
        p.ring.complete(c.cmd_id, 0)
    p.ring.flush()
    p.kernel.irqcontrol()
    assert not p.kernel.qfull  # space freed: the queued command went into the ring
    assert len(p.ring.drain()) == 1


def test_out_of_order_completion_matches_by_cmd_id(pair):
    """§1.7 OOOC: a completion written in another command's slot is matched by cmd_id."""
    for tag in (1, 2, 3):
        pair.submit(read10(tag, 1), data_in_len=512, tag=tag)
    c1, c2, c3 = pair.ring.drain()
    for c, b in ((c1, 0x11), (c2, 0x22), (c3, 0x33)):
        fill(c, b)
    for c in (c3, c1, c2):
        pair.ring.complete(c.cmd_id, 0)
        pair.ring.flush()
        pair.kernel.irqcontrol()
    assert pair.results[1].data == b"\x11" * 512
    assert pair.results[2].data == b"\x22" * 512
    assert pair.results[3].data == b"\x33" * 512
    assert pair.kernel.stats["broken"] == 0


def test_unknown_cmd_id_breaks_the_ring_until_reset(pair):
    pair.submit(read10(0, 1), data_in_len=512, tag=1)
    (c,) = pair.ring.drain()
    pair.ring.complete(c.cmd_id + 100, 0)  # a stale id
    pair.ring.flush()
    pair.kernel.irqcontrol()
    assert pair.kernel.broken
    pair.submit(read10(0, 1), data_in_len=512, tag=2)
    r = pair.results[2]
    assert r.status == 2 and r.sense[2] == 0x02 and r.sense[12] == 0x08  # LUN COMM FAILURE
    pair.kernel.reset_ring(1)
    assert pair.results[1].status == 0x08  # in-flight command failed BUSY by the reset
    pair.ring.reset()
    pair.submit(read10(0, 1), data_in_len=512, tag=3)
    (c,) = pair.ring.drain()
    fill(c, 7)
    pair.ring.complete(c.cmd_id, 0)
    pair.ring.flush()
    pair.kernel.irqcontrol()
    assert pair.results[3].status == 0 and pair.results[3].data == b"\x07" * 512


def test_tmr_entries_are_reported_and_skipped_without_breaking_the_ring(make_pair):
    p = make_pair(cmdr_size=4096, data_size=256 * 1024, tmr_notification=True)
    a = p.submit(read10(0, 1), data_in_len=512, tag=1)
    p.submit(read10(1, 1), data_in_len=512, tag=2)
    c1, c2 = p.ring.drain()
    p.kernel.abort([a])
    assert p.results[1].status == 0x40  # TASK ABORTED, answered by the kernel
    (tmr,) = p.ring.drain()
    assert isinstance(tmr, TmrEntry)
    assert tmr.tmr_type == abi.TMR_ABORT_TASK and tmr.cmd_ids == (c1.cmd_id,)
    # the aborted command is still completed by userspace; the kernel drops the result
    fill(c2, 0x22)
    p.ring.complete(c2.cmd_id, 0)
    p.ring.complete(c1.cmd_id, 0)
    p.ring.flush()
    p.kernel.irqcontrol()
    assert p.results[2].data == b"\x22" * 512
    assert not p.kernel.broken and p.kernel.last_cleaned == p.kernel.head


def test_qfull_when_the_data_area_is_full_then_drains(make_pair):
    p = make_pair(cmdr_size=64 * 1024, data_size=64 * 1024)
    for i in range(6):  # 6 x 16 KiB into a 64 KiB data area
        p.submit(read10(i * 32, 32), data_in_len=16384, tag=i)
    assert len(p.kernel.qfull) == 2
    first = p.ring.drain()
    assert len(first) == 4
    for c in first:
        fill(c, c.cmd_id)
        p.ring.complete(c.cmd_id, 0)
    p.ring.flush()
    p.kernel.irqcontrol()
    assert not p.kernel.qfull
    rest = p.ring.drain()
    assert len(rest) == 2
    for c in rest:
        p.ring.complete(c.cmd_id, 0)
    p.ring.flush()
    p.kernel.irqcontrol()
    assert sorted(p.results) == list(range(6))
    assert all(r.status == 0 for r in p.results.values())


def test_contiguous_data_blocks_are_merged_into_one_iovec(make_pair):
    p = make_pair(cmdr_size=4096, data_size=1024 * 1024)
    p.submit(read10(0, 128), data_in_len=65536, tag=1)
    (c,) = p.ring.drain()
    assert len(c.iov) == 1 and len(c.iov[0]) == 65536


def test_fragmented_data_area_gives_several_iovecs(make_pair):
    p = make_pair(cmdr_size=8192, data_size=64 * 1024)  # 16 data blocks
    for i in range(16):
        p.submit(read10(i, 8), data_in_len=4096, tag=i)
    cmds = p.ring.drain()
    for c in (cmds[3], cmds[7]):  # free blocks 3 and 7 only
        p.ring.complete(c.cmd_id, 0)
    p.ring.flush()
    p.kernel.irqcontrol()
    p.submit(write10(9, 16), data_out=b"A" * 4096 + b"B" * 4096, tag=99)
    (got,) = p.ring.drain()
    assert got.cdb[0] == 0x2A and len(got.iov) == 2
    assert bytes(got.iov[0]) == b"A" * 4096 and bytes(got.iov[1]) == b"B" * 4096


def test_read_len_reports_a_short_transfer(pair):
    pair.submit(bytes([0x12, 0, 0, 0, 255, 0]), data_in_len=255, tag=1)
    (c,) = pair.ring.drain()
    c.iov[0][:36] = b"x" * 36
    pair.ring.complete(c.cmd_id, 0, read_len=36)
    pair.ring.flush()
    pair.kernel.irqcontrol()
    assert pair.results[1].data == b"x" * 36


def test_check_condition_sense_reaches_the_kernel(pair):
    pair.submit(read10(0, 1), data_in_len=512, tag=1)
    (c,) = pair.ring.drain()
    sense = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x21, 0x00, 0, 0, 0, 0])
    pair.ring.complete(c.cmd_id, 2, sense)
    pair.ring.flush()
    pair.kernel.irqcontrol()
    assert pair.results[1].status == 2 and pair.results[1].sense == sense


def test_one_wakeup_write_per_batch(pair):
    for i in range(10):
        pair.submit(read10(i, 1), data_in_len=512, tag=i)
    cmds = pair.ring.drain()
    assert len(cmds) == 10
    for c in cmds:
        pair.ring.complete(c.cmd_id, 0)
    pair.ring.flush()
    assert pair.ring.wakeups == 1
    assert pair.kernel.irqcontrol() == 1
    assert len(pair.results) == 10


def _raw_cmd(cmd_id: int, *, length: int, iov_cnt: int = 0, cdb_off: int | None = None,
             iovs: tuple[tuple[int, int], ...] = (), cdb: bytes = b"\x00" * 6) -> bytes:
    buf = bytearray(length)
    abi.HDR.pack_into(buf, 0, length | abi.OP_CMD, cmd_id, 0, 0)
    struct.pack_into("<III", buf, 8, iov_cnt, 0, 0)
    struct.pack_into("<Q", buf, 24, 0 if cdb_off is None else cdb_off)
    for i, (o, ln) in enumerate(iovs):
        struct.pack_into("<QQ", buf, 48 + 16 * i, o, ln)
    return bytes(buf)


def test_malformed_cdb_offset_is_flagged_unknown_op_and_the_ring_goes_on(pair):
    k, ring = pair.kernel, pair.ring
    ent_abs = abi.CMDR_OFF + k.head
    raw = _raw_cmd(7, length=128, cdb_off=10**12)
    k.commands[7] = type("C", (), {"cmd_id": 7})()  # the kernel knows the id
    k.write_raw_entry(raw)
    (m,) = ring.drain()
    assert isinstance(m, MalformedEntry) and "cdb_off" in m.reason
    assert k.mm[ent_abs + 7] & abi.UFLAG_UNKNOWN_OP
    # a normal command after it still works
    pair.submit(read10(0, 1), data_in_len=512, tag=1)
    (c,) = ring.drain()
    assert isinstance(c, Command)


def test_iovec_outside_the_data_area_is_malformed(pair):
    k = pair.kernel
    ent_abs = abi.CMDR_OFF + k.head
    raw = _raw_cmd(5, length=128, iov_cnt=1, cdb_off=ent_abs + 112,
                   iovs=((k.map_size - 100, 4096),))
    k.write_raw_entry(raw)
    (m,) = pair.ring.drain()
    assert isinstance(m, MalformedEntry) and "iovec" in m.reason


def test_zero_length_entry_stops_the_walk_without_crashing(pair):
    k = pair.kernel
    k.write_raw_entry(struct.pack("<IHBB", 0 | abi.OP_CMD, 1, 0, 0))
    assert pair.ring.drain() == []
    assert pair.ring.corrupt and "length" in pair.ring.corrupt
