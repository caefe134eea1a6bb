"""The ``file`` handler called directly, no ring: buffers are bytearray/mmap memoryviews."""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcmu_py.handler import ConfigError, DeviceInfo, capabilities, pool_size
from tcmu_py_handlers.file import FileConfig, FileHandler

BS = 512
MiB = 1 << 20


def _open(cfg: str, size: int = MiB, write_cache: bool = True) -> FileHandler:
    dev = DeviceInfo(
        name="f0",
        cfgstring=cfg,
        config=FileHandler.parse_config(cfg),
        block_size=BS,
        num_lbas=size // BS,
        write_cache=write_cache,
    )
    h = FileHandler()
    h.open(dev, reopen=False)
    return h


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[FileHandler]:
    h = _open(f"{tmp_path}/disk.img")
    yield h
    h.close()


def _views(data: bytearray, *cuts: int) -> list[memoryview]:
    """Split one buffer into several iovec-like views at the given offsets."""
    mv = memoryview(data)
    edges = [0, *cuts, len(data)]
    return [mv[a:b] for a, b in itertools.pairwise(edges)]


def _write(h: FileHandler, offset: int, data: bytes, fua: bool = False) -> None:
    h.write(offset, len(data), [memoryview(bytearray(data))], fua)


def _read(h: FileHandler, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    h.read(offset, length, [memoryview(buf)])
    return bytes(buf)


def _pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# ---- config string -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ("/tmp/x.img", FileConfig("/tmp/x.img")),
        ("/tmp/x.img;threads=4", FileConfig("/tmp/x.img", threads=4)),
        ("/d/x;direct=1;readonly=1", FileConfig("/d/x", direct=True, readonly=True)),
        ("/dev/sdb;readonly=0", FileConfig("/dev/sdb")),
    ],
)
def test_parse_config_accepts_tcmu_runner_paths_and_our_options(
    cfg: str, expected: FileConfig
) -> None:
    assert FileHandler.parse_config(cfg) == expected


@pytest.mark.parametrize(
    ("cfg", "token"),
    [
        ("", ""),
        ("tmp/x.img", "tmp/x.img"),
        ("/x;threads=0", "threads=0"),
        ("/x;threads=many", "threads=many"),
        ("/x;sync=1", "sync=1"),
        ("/x;direct=2", "direct=2"),
    ],
)
def test_parse_config_errors_name_the_bad_token(cfg: str, token: str) -> None:
    with pytest.raises(ConfigError) as info:
        FileHandler.parse_config(cfg)
    assert info.value.token == token


def test_threads_option_sets_the_pool_size() -> None:
    assert FileHandler.thread_model == "threads"
    assert pool_size(FileHandler, FileHandler.parse_config("/x;threads=4")) == 4
    assert pool_size(FileHandler, FileHandler.parse_config("/x")) == 2


# ---- open ------------------------------------------------------------------------------


def test_a_missing_file_is_created_sparse_at_the_device_size(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    h = _open(str(path), size=64 * MiB)
    try:
        st = path.stat()
        assert st.st_size == 64 * MiB
        assert st.st_blocks * 512 < MiB  # sparse
        assert st.st_mode & 0o777 == 0o600
        assert _read(h, 64 * MiB - BS, BS) == bytes(BS)
    finally:
        h.close()


def test_a_file_smaller_than_the_device_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "small.img"
    path.write_bytes(bytes(4096))
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ConfigError) as info:
        _open(str(path), size=MiB)
    assert info.value.token == str(path)
    assert "4096 bytes, smaller than the device (1048576 bytes)" in str(info.value)
    assert "truncate -s 1048576" in str(info.value)
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the fd was closed
    assert path.stat().st_size == 4096  # and the file left alone


def test_a_larger_file_is_accepted_and_kept_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(_pattern(2 * MiB))
    h = _open(str(path), size=MiB)
    try:
        assert _read(h, 0, 4096) == _pattern(4096)
    finally:
        h.close()
    assert path.stat().st_size == 2 * MiB


def test_something_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        _open(str(tmp_path))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="neither a regular file nor a block device"):
        _open(f"{tmp_path}/fifo")


def test_reopen_sees_the_data_written_before(tmp_path: Path) -> None:
    h = _open(f"{tmp_path}/r.img")
    _write(h, 8 * BS, b"persist!" * 64)
    h.close()
    h.close()  # a second close is harmless
    h.open(h.dev, reopen=True)
    try:
        assert _read(h, 8 * BS, BS) == b"persist!" * 64
    finally:
        h.close()


# ---- the data path ---------------------------------------------------------------------


def test_read_after_write_through_several_iovecs(handler: FileHandler) -> None:
    data = bytearray(_pattern(8 * BS))
    handler.write(3 * BS, len(data), _views(data, 100, 1000, 3000), fua=False)
    out = bytearray(len(data))
    handler.read(3 * BS, len(out), _views(out, 512, 513, 4000))
    assert out == data


def test_read_and_write_at_the_last_block(handler: FileHandler) -> None:
    last = MiB - BS
    _write(handler, last, b"\xee" * BS)
    assert _read(handler, last, BS) == b"\xee" * BS
    assert _read(handler, last - BS, BS) == bytes(BS)


def test_more_iovecs_than_one_syscall_takes(handler: FileHandler) -> None:
    n = os.sysconf("SC_IOV_MAX") + 300
    data = bytearray(_pattern(n * BS, seed=5))
    handler.write(0, len(data), _views(data, *range(BS, n * BS, BS)), fua=False)
    out = bytearray(len(data))
    handler.read(0, len(out), _views(out, *range(BS, n * BS, BS)))
    assert out == data


def test_buffers_longer_than_the_transfer_are_not_overrun(handler: FileHandler) -> None:
    _write(handler, 0, b"\x11" * (2 * BS))
    out = bytearray(b"\xff" * (3 * BS))
    handler.read(0, BS, [memoryview(out)])
    assert out == b"\x11" * BS + b"\xff" * (2 * BS)
    handler.write(BS, BS, [memoryview(bytearray(b"\x22" * (2 * BS)))], fua=False)
    assert _read(handler, 0, 3 * BS) == b"\x11" * BS + b"\x22" * BS + bytes(BS)


def test_fua_and_flush_leave_the_data_in_the_file(tmp_path: Path, handler: FileHandler) -> None:
    assert FileHandler.native_fua and capabilities(FileHandler, handler).fua
    _write(handler, 0, b"F" * BS, fua=True)
    _write(handler, BS, b"L" * BS)
    handler.flush()
    with open(tmp_path / "disk.img", "rb") as f:
        assert f.read(2 * BS) == b"F" * BS + b"L" * BS


def test_a_write_through_device_still_reads_back(tmp_path: Path) -> None:
    h = _open(f"{tmp_path}/wt.img", write_cache=False)
    try:
        _write(h, 0, b"w" * BS)
        assert _read(h, 0, BS) == b"w" * BS
        h.reconfig("write_cache", True)
        _write(h, BS, b"c" * BS)
        assert _read(h, BS, BS) == b"c" * BS
    finally:
        h.close()


def test_a_read_past_a_shrunk_file_is_an_io_error(tmp_path: Path, handler: FileHandler) -> None:
    os.truncate(tmp_path / "disk.img", 4096)
    with pytest.raises(OSError) as info:
        _read(handler, 0, 8192)
    assert info.value.errno == errno.EIO


def test_o_direct_works_with_page_aligned_ring_memory(tmp_path: Path) -> None:
    h = _open(f"{tmp_path}/direct.img;direct=1")
    ring = mmap.mmap(-1, 16384)  # the ring's data area is an mmap too
    try:
        ring[:8192] = _pattern(8192, seed=9)
        mv = memoryview(ring)
        h.write(4096, 8192, [mv[:4096], mv[4096:8192]], fua=True)
        h.read(4096, 8192, [mv[8192:]])
        assert mv[8192:] == _pattern(8192, seed=9)
        mv.release()
    finally:
        ring.close()
        h.close()


# ---- thin provisioning -----------------------------------------------------------------

# tmpfs cannot FALLOC_FL_ZERO_RANGE, so it takes the fallback paths
FILESYSTEMS = ["tmp_path"] + (["shm"] if os.path.isdir("/dev/shm") else [])


@pytest.fixture(params=FILESYSTEMS)
def fs_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    if request.param == "tmp_path":
        yield tmp_path
        return
    d = Path(f"/dev/shm/tcmu-py-test-{os.getpid()}-{request.node.name}")
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _allocated(h: FileHandler) -> int:
    return os.stat(h.dev.config.path).st_blocks * 512


def test_unmap_punches_a_hole_that_reads_as_zeroes(fs_dir: Path) -> None:
    h = _open(f"{fs_dir}/thin.img")
    try:
        caps = capabilities(FileHandler, h)
        assert caps.unmap and caps.lbprz and caps.write_same and caps.flush
        _write(h, 0, _pattern(256 * 1024))
        before = _allocated(h)
        h.unmap(64 * 1024, 128 * 1024)
        assert _read(h, 64 * 1024, 128 * 1024) == bytes(128 * 1024)
        assert _read(h, 0, 64 * 1024) == _pattern(256 * 1024)[: 64 * 1024]
        assert _allocated(h) <= before - 128 * 1024
    finally:
        h.close()


def test_write_same_repeats_a_pattern_over_several_chunks(fs_dir: Path) -> None:
    h = _open(f"{fs_dir}/ws.img", size=4 * MiB)
    try:
        block = _pattern(BS, seed=3)
        h.write_same(BS, 3 * MiB, block, unmap=False)
        assert _read(h, BS, 3 * MiB) == block * (3 * MiB // BS)
        assert _read(h, 0, BS) == bytes(BS)
        assert _read(h, 3 * MiB + BS, BS) == bytes(BS)
    finally:
        h.close()


def test_write_same_of_zeroes_zeroes_and_with_unmap_frees_the_space(fs_dir: Path) -> None:
    h = _open(f"{fs_dir}/wz.img")
    try:
        _write(h, 0, b"\xaa" * MiB)
        h.write_same(0, 256 * 1024, bytes(BS), unmap=False)
        assert _read(h, 0, 256 * 1024) == bytes(256 * 1024)
        allocated = _allocated(h)
        h.write_same(256 * 1024, 256 * 1024, bytes(BS), unmap=True)
        assert _read(h, 0, 512 * 1024) == bytes(512 * 1024)
        assert _read(h, 512 * 1024, BS) == b"\xaa" * BS
        assert _allocated(h) <= allocated - 256 * 1024
    finally:
        h.close()


def test_write_same_with_unmap_and_a_nonzero_pattern_writes_it(handler: FileHandler) -> None:
    handler.write_same(0, 8 * BS, b"\x5a" * BS, unmap=True)
    assert _read(handler, 0, 8 * BS) == b"\x5a" * (8 * BS)


# ---- read-only -------------------------------------------------------------------------


def test_readonly_neither_creates_nor_writes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _open(f"{tmp_path}/absent.img;readonly=1")
    assert not (tmp_path / "absent.img").exists()
    (tmp_path / "ro.img").write_bytes(_pattern(MiB))
    h = _open(f"{tmp_path}/ro.img;readonly=1")
    try:
        caps = capabilities(FileHandler, h)
        assert caps.readonly and not caps.unmap and not caps.write_same and not caps.lbprz
        assert _read(h, BS, BS) == _pattern(MiB)[BS : 2 * BS]
        with pytest.raises(OSError):
            _write(h, 0, bytes(BS))
    finally:
        h.close()


# ---- live changes ----------------------------------------------------------------------


def test_resize_grows_the_file_and_never_shrinks_it(tmp_path: Path, handler: FileHandler) -> None:
    path = tmp_path / "disk.img"
    handler.reconfig("size", 3 * MiB)
    assert path.stat().st_size == 3 * MiB
    _write(handler, 3 * MiB - BS, b"e" * BS)
    assert _read(handler, 3 * MiB - BS, BS) == b"e" * BS
    handler.reconfig("size", MiB)
    assert path.stat().st_size == 3 * MiB


def test_a_new_config_string_is_refused_live(handler: FileHandler) -> None:
    handler.reconfig("cfgstring", handler.dev.cfgstring)  # unchanged: accepted
    with pytest.raises(OSError) as info:
        handler.reconfig("cfgstring", "/elsewhere.img")
    assert info.value.errno == errno.EOPNOTSUPP


# ---- block devices ---------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A 4 MiB loop device over a file on tmp_path (needs root and losetup)."""
    losetup = shutil.which("losetup")
    if os.geteuid() != 0 or losetup is None:
        why = "block device tests need root and losetup"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    backing = tmp_path / "loop-backing.img"
    backing.write_bytes(_pattern(4 * MiB, seed=11))
    dev = subprocess.run(
        [losetup, "--find", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "--detach", dev], check=True)


def test_a_block_device_is_served_in_place(loop_device: str) -> None:
    h = _open(loop_device, size=2 * MiB)
    try:
        caps = capabilities(FileHandler, h)
        assert not caps.lbprz  # a discard need not read back as zeroes
        assert _read(h, 0, BS) == _pattern(4 * MiB, seed=11)[:BS]
        _write(h, MiB, b"B" * BS, fua=True)
        assert _read(h, MiB, BS) == b"B" * BS
        h.write_same(2 * BS, 4 * BS, bytes(BS), unmap=False)  # ZERO_RANGE on a block device
        assert _read(h, 2 * BS, 4 * BS) == bytes(4 * BS)
        if caps.unmap:  # loop devices discard when their backing filesystem punches
            h.unmap(MiB, 4096)
        h.reconfig("size", 4 * MiB)  # within the device: fine
        with pytest.raises(OSError) as info:
            h.reconfig("size", 8 * MiB)
        assert info.value.errno == errno.ENOSPC
    finally:
        h.close()


def test_a_block_device_smaller_than_the_device_is_refused(loop_device: str) -> None:
    with pytest.raises(ConfigError, match="smaller than the device"):
        _open(loop_device, size=8 * MiB)
