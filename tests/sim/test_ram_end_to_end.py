"""The ram handler end to end on the simulated kernel: every byte written through the
ring comes back, across the whole device, at its last block, and across a ring wrap."""

from __future__ import annotations

import os
import random
import struct

import pytest

from tcmu_py.sim import SimTarget
from tcmu_py_handlers.ram import RamHandler

BS = 512


@pytest.fixture
def ram():
    with SimTarget(RamHandler, "ram/", size=8 * 1024 * 1024, data_size=4 * 1024 * 1024,
                   cmdr_size=16 * 1024) as t:
        yield t


def test_inquiry_identifies_as_lio_tcmu_device(ram):
    res = ram.submit(bytes([0x12, 0, 0, 0, 96, 0]), data_in_len=96)
    assert res.status == 0
    assert res.data[8:16] == b"LIO-ORG "
    assert res.data[16:32] == b"TCMU device     "


def test_read_capacity_reports_the_device_size(ram):
    res = ram.submit(bytes([0x25]) + bytes(9), data_in_len=8)
    last_lba, bs = struct.unpack(">II", res.data)
    assert (last_lba + 1) * bs == 8 * 1024 * 1024 and bs == BS
    res = ram.submit(bytes([0x9E, 0x10]) + bytes(8) + struct.pack(">I", 32) + bytes(2), data_in_len=32)
    last_lba, bs = struct.unpack_from(">QI", res.data)
    assert (last_lba + 1) * bs == 8 * 1024 * 1024


def test_test_unit_ready_and_synchronize_cache_are_good(ram):
    assert ram.submit(bytes(6)).status == 0
    ram.flush()


def test_random_patterns_over_the_whole_device_read_back(ram):
    rnd = random.Random(1)
    n_lbas = ram.num_lbas
    chunk = 128  # 64 KiB per command
    written = {}
    for lba in range(0, n_lbas, chunk):
        data = rnd.randbytes(chunk * BS)
        ram.write(lba, data)
        written[lba] = data
    for lba, data in written.items():
        assert ram.read(lba, chunk) == data


def test_the_last_block_is_writable_and_one_past_it_is_out_of_range(ram):
    last = ram.num_lbas - 1
    ram.write(last, b"\xab" * BS)
    assert ram.read(last, 1) == b"\xab" * BS
    res = ram.submit(struct.pack(">BBQIBB", 0x88, 0, last, 2, 0, 0), data_in_len=2 * BS)
    assert res.status == 2 and res.sense[2] & 0xF == 5 and res.sense[12] == 0x21


def test_requests_straddling_a_ring_wrap_keep_their_data(ram):
    """16 KiB ring: a few hundred commands wrap it many times; a 64 KiB transfer with
    its entry right before the end must still carry exactly its data."""
    rnd = random.Random(2)
    for i in range(600):
        n = rnd.choice([1, 8, 128])
        lba = rnd.randrange(0, ram.num_lbas - n)
        data = rnd.randbytes(n * BS)
        ram.write(lba, data)
        assert ram.read(lba, n) == data, f"iteration {i}"
    assert ram.kernel.stats["broken"] == 0


def test_concurrent_commands_complete_out_of_order_with_the_right_data(ram):
    rnd = random.Random(3)
    blobs = {lba: rnd.randbytes(8 * BS) for lba in range(0, 8 * 64, 8)}
    futs = [ram.submit_nowait(struct.pack(">BBQIBB", 0x8A, 0, lba, 8, 0, 0), d)
            for lba, d in blobs.items()]
    assert all(f.result(10).status == 0 for f in futs)
    futs = {lba: ram.submit_nowait(struct.pack(">BBQIBB", 0x88, 0, lba, 8, 0, 0), None, 8 * BS)
            for lba in blobs}
    for lba, f in futs.items():
        assert f.result(10).data == blobs[lba]


def test_unserved_opcode_is_refused_and_the_device_keeps_serving(ram):
    res = ram.submit(bytes([0xC5]) + bytes(9))  # vendor-specific, never served
    assert res.status == 2 and res.sense[2] & 0xF == 5 and res.sense[12] == 0x20
    ram.write(0, b"\x11" * BS)
    assert ram.read(0, 1) == b"\x11" * BS


def test_transfer_length_larger_than_the_buffer_is_refused(ram):
    # READ(10) of 8 blocks, but the initiator's buffer holds only 1
    res = ram.submit(struct.pack(">BBIBHB", 0x28, 0, 0, 0, 8, 0), data_in_len=BS)
    assert res.status == 2 and res.sense[2] & 0xF == 5


def test_short_cdb_is_refused_with_sense_not_a_crash(ram):
    # a 10-byte opcode delivered with garbage: still answered, device still serving
    res = ram.submit(bytes([0x28, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0xFF, 0xFF, 0xFF]),
                     data_in_len=BS)
    assert res.status == 2
    assert ram.read(0, 1) is not None


def test_unmapped_blocks_read_back_as_zeroes(ram):
    ram.write(64, os.urandom(16 * BS))
    # UNMAP one descriptor: LBA 64, 16 blocks
    param = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 64, 16)
    res = ram.submit(struct.pack(">BB4xBHB", 0x42, 0, 0, len(param), 0), param)
    assert res.status == 0
    assert ram.read(64, 16) == bytes(16 * BS)
