"""A simulated target_core_user: the kernel's side of one device's ring, byte for byte.

It follows tcmu.c as described in reference/tcmu.md §1.4-1.11: a version-2 mailbox with
the four CAP flags, a PAD entry when a command would cross the ring end, one byte of the
ring always left free, data blocks allocated lowest-first with contiguous blocks merged
into one iovec, a qfull queue when ring or data area is full, a completion walk that
looks commands up by cmd_id (an unknown id breaks the ring until reset_ring), READ_LEN
and UNKNOWN_OP honoured, TMR entries when tmr_notification is on, and block_dev.

The shared memory is a memfd, so the runner maps it through the same shim call it uses
for /dev/uioN.  Notifications travel over a datagram socketpair: unlike an eventfd
(which insists on 8-byte reads and writes) it carries the uio's exact 4-byte write and
4-byte read, so the shim's wakeup and poll path run unchanged.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tcmu_py import abi

__all__ = ["SimCommand", "SimKernel", "SimResult"]

_HDR = abi.HDR
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_IOV = struct.Struct("<QQ")
_REQ = struct.Struct("<III4xQ")  # iov_cnt, iov_bidi_cnt, iov_dif_cnt, cdb_off
_RSP = struct.Struct("<BxxxI")  # scsi_status, read_len

# sense the kernel itself produces (target_core_transport.c sense table)
_SENSE_INVALID_CDB = bytes([0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00]) + bytes(4)
_SENSE_LUN_COMM_FAILURE = bytes([0x70, 0, 0x02, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x08, 0x00]) + bytes(4)

GOOD = 0x00
CHECK_CONDITION = 0x02
BUSY = 0x08
TASK_SET_FULL = 0x28
TASK_ABORTED = 0x40


@dataclass
class SimResult:
    status: int
    sense: bytes
    data: bytes


@dataclass
class SimCommand:
    cdb: bytes
    data_out: bytes | memoryview | None
    data_in_len: int
    on_done: Callable[[SimResult], None]
    cmd_id: int = 0
    blocks: list[int] = field(default_factory=list)
    iovs: list[tuple[int, int]] = field(default_factory=list)  # (abs offset, len)
    aborted: bool = False


def _sense_len(sense: bytes) -> int:
    """Bytes of real sense data: 8 + ADDITIONAL SENSE LENGTH (fixed and descriptor)."""
    if len(sense) < 8 or (sense[0] & 0x7F) not in (0x70, 0x71, 0x72, 0x73):
        return 0
    return min(len(sense), 8 + sense[7])


class SimKernel:
    """The kernel side of one TCMU device (thread-safe; one lock like tcmu.c's cmdr_lock)."""

    def __init__(
        self,
        *,
        cmdr_size: int = abi.DEFAULT_CMDR_SIZE,
        data_size: int = 64 * 1024 * 1024,
        flags: int = abi.MB_FLAGS_ALL,
        tmr_notification: bool = False,
        qfull_time_out: int = -1,
    ) -> None:
        if cmdr_size % 8 or cmdr_size < 4096:
            raise ValueError("cmdr_size must be a multiple of 8 and at least 4096")
        self.cmdr_size = cmdr_size
        self.data_off = abi.CMDR_OFF + cmdr_size
        self.data_size = data_size // abi.DATA_BLOCK_SIZE * abi.DATA_BLOCK_SIZE
        self.map_size = self.data_off + self.data_size
        self.tmr_notification = tmr_notification
        self.qfull_time_out = qfull_time_out
        self.memfd = os.memfd_create("tcmu-sim", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, self.map_size)
        self.mm = mmap.mmap(self.memfd, self.map_size)
        self.kernel_sock, self.user_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.kernel_sock.setblocking(False)
        self.user_sock.setblocking(False)
        mm = self.mm
        struct.pack_into("<HHII", mm, 0, abi.TCMU_MAILBOX_VERSION, flags, abi.CMDR_OFF, cmdr_size)
        # The indices are shared with another process: struct's little-endian packers
        # store byte by byte, so a reader could see a torn value.  An item of a native
        # 'I' memoryview is one aligned 4-byte load or store (x86 keeps stores ordered,
        # which gives the kernel's store-release / load-acquire pairing).
        self._mb32 = memoryview(mm).cast("B")[: abi.MAILBOX_SIZE].cast("I")
        self._set_head(0)
        self._mb32[abi.MB_CMD_TAIL_OFF // 4] = 0
        self.lock = threading.RLock()
        self.head = 0
        self.last_cleaned = 0
        self.commands: dict[int, SimCommand] = {}
        self.kept: dict[int, SimCommand] = {}
        self.free_ids = list(range(1, 0x10000))  # a heap: lowest id first, like xa_alloc
        self.nblocks = self.data_size // abi.DATA_BLOCK_SIZE
        self.block_free = bytearray(b"\x01") * self.nblocks
        self.free_block_count = self.nblocks
        self.qfull: collections.deque[SimCommand] = collections.deque()
        self.tmr_queue: collections.deque[tuple[int, list[int]]] = collections.deque()
        self.broken = False
        self.blocked = False
        self.stats = collections.Counter[str]()
        self._thread: threading.Thread | None = None
        # 6.x kernels plug the submission queue and notify once per batch (§1.8);
        # completions that queue new commands (qfull, callbacks) are one batch
        self._plugged = False
        self._notify_pending = False
        self._stop = False

    # -- what the runner gets ------------------------------------------------------------
    @property
    def user_fd(self) -> int:
        """The runner's end of the notification channel (what /dev/uioN's fd is for events).

        The memory is mapped from ``memfd`` instead."""
        return self.user_sock.fileno()

    def _set_head(self, head: int) -> None:
        """Publish cmd_head after the entry is written (one 4-byte store)."""
        self._mb32[abi.MB_CMD_HEAD_OFF // 4] = head

    # -- notification ------------------------------------------------------------------
    def _notify(self) -> None:
        if self._plugged:
            self._notify_pending = True  # one wakeup when the batch is done (unplug)
            return
        # a full socket means the runner already has unread wakeups: one is as good as many
        with contextlib.suppress(BlockingIOError):
            self.kernel_sock.send(b"\x01\x00\x00\x00")

    def start(self) -> None:
        """Run the irqcontrol side in a thread: every 4-byte write runs the completion walk."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._irq_loop, name="sim-kernel", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _irq_loop(self) -> None:
        import select

        poller = select.poll()
        poller.register(self.kernel_sock, select.POLLIN)
        while not self._stop:
            if poller.poll(100):
                self.irqcontrol()

    def irqcontrol(self) -> int:
        """Drain the runner's 4-byte writes, then handle completions (tcmu_irqcontrol)."""
        n = 0
        while True:
            try:
                msg = self.kernel_sock.recv(16)
            except BlockingIOError:
                break
            if len(msg) != 4:
                self.stats["bad_wakeup_size"] += 1
            n += 1
        if n:
            self.stats["wakeups"] += n
            self.handle_completions()
        return n

    # -- submission ----------------------------------------------------------------------
    def queue(
        self,
        cdb: bytes,
        data_out: bytes | memoryview | None,
        data_in_len: int,
        on_done: Callable[[SimResult], None],
    ) -> SimCommand:
        """Queue one command (tcmu_queue_cmd); ``on_done`` runs with the lock held."""
        cmd = SimCommand(bytes(cdb), data_out, data_in_len, on_done)
        with self.lock:
            self.stats["submitted"] += 1
            if self.broken:
                self._finish(cmd, SimResult(CHECK_CONDITION, _SENSE_LUN_COMM_FAILURE, b""))
                return cmd
            if self.qfull or self.blocked or not self._try_queue(cmd):
                if self.qfull_time_out == 0 and not self.blocked:
                    self._finish(cmd, SimResult(TASK_SET_FULL, b"", b""))
                else:
                    self.qfull.append(cmd)
                    self.stats["qfull"] += 1
        return cmd

    def _data_len(self, cmd: SimCommand) -> int:
        if cmd.data_out is not None:
            return len(cmd.data_out)
        return cmd.data_in_len

    def _try_queue(self, cmd: SimCommand) -> bool:
        """Write the entry if ring and data area have room; False leaves it for qfull."""
        cdb = cmd.cdb
        cdb_len = abi.scsi_command_size(cdb[0], cdb[7] if len(cdb) > 7 else 0)
        dlen = self._data_len(cmd)
        nblk = -(-dlen // abi.DATA_BLOCK_SIZE)
        if nblk > self.nblocks:
            self._finish(cmd, SimResult(CHECK_CONDITION, _SENSE_INVALID_CDB, b""))
            return True
        # plan the iovecs first (needs the block numbers)
        if nblk > self.free_block_count:
            return False
        blocks = self._alloc_blocks(nblk, commit=False)
        iovs = self._merge(blocks, dlen)
        base = abi.cmd_entry_base_size(len(iovs))
        cmd_size = base + abi.round_up(cdb_len, 8)
        size = self.cmdr_size
        if cmd_size > size // 2:
            self._finish(cmd, SimResult(CHECK_CONDITION, _SENSE_INVALID_CDB, b""))
            return True
        head = self.head
        to_end = size - head
        needed = cmd_size if to_end >= cmd_size else cmd_size + to_end
        used = (head - self.last_cleaned) % size
        if size - used - 1 < needed:
            self.stats["ring_full"] += 1
            return False
        if not self.free_ids:
            return False
        mm = self.mm
        if to_end < cmd_size:
            # §1.7: a PAD to the ring end; entries never wrap
            _HDR.pack_into(mm, abi.CMDR_OFF + head, to_end | abi.OP_PAD, 0, 0, 0)
            head = 0
        self._alloc_blocks(nblk, commit=True, blocks=blocks)
        cmd.blocks = blocks
        cmd.iovs = iovs
        cmd.cmd_id = heapq.heappop(self.free_ids)
        self.commands[cmd.cmd_id] = cmd
        if cmd.data_out is not None:
            self._copy_out(cmd)
        ent = abi.CMDR_OFF + head
        mm[ent : ent + cmd_size] = bytes(cmd_size)
        _HDR.pack_into(mm, ent, cmd_size | abi.OP_CMD, cmd.cmd_id, 0, 0)
        cdb_off = ent + base
        _REQ.pack_into(mm, ent + 8, len(iovs), 0, 0, cdb_off)
        for i, (off, ln) in enumerate(iovs):
            _IOV.pack_into(mm, ent + abi.REQ_IOV_OFF + 16 * i, off, ln)
        mm[cdb_off : cdb_off + min(len(cdb), cdb_len)] = cdb[:cdb_len]
        self.head = (head + cmd_size) % size
        self._set_head(self.head)
        self._notify()
        return True

    def _alloc_blocks(self, n: int, *, commit: bool, blocks: list[int] | None = None) -> list[int]:
        if commit:
            assert blocks is not None
            for b in blocks:
                self.block_free[b] = 0
            self.free_block_count -= len(blocks)
            return blocks
        out: list[int] = []
        start = 0
        find = self.block_free.find
        while len(out) < n:
            b = find(1, start)
            if b < 0:
                break
            out.append(b)
            start = b + 1
        return out

    def _merge(self, blocks: list[int], dlen: int) -> list[tuple[int, int]]:
        """Contiguous blocks become one iovec (tcmu.c new_block_to_iov)."""
        iovs: list[list[int]] = []
        left = dlen
        bs = abi.DATA_BLOCK_SIZE
        for b in blocks:
            ln = min(bs, left)
            off = self.data_off + b * bs
            if iovs and iovs[-1][0] + iovs[-1][1] == off:
                iovs[-1][1] += ln
            else:
                iovs.append([off, ln])
            left -= ln
        return [(o, ln) for o, ln in iovs]

    def _copy_out(self, cmd: SimCommand) -> None:
        src = memoryview(cmd.data_out) if cmd.data_out is not None else memoryview(b"")
        pos = 0
        for off, ln in cmd.iovs:
            self.mm[off : off + ln] = src[pos : pos + ln]
            pos += ln

    def _copy_in(self, cmd: SimCommand, n: int) -> bytes:
        parts = []
        left = n
        for off, ln in cmd.iovs:
            take = min(ln, left)
            if take <= 0:
                break
            parts.append(self.mm[off : off + take])
            left -= take
        return b"".join(parts)

    def _free_cmd(self, cmd: SimCommand) -> None:
        for b in cmd.blocks:
            self.block_free[b] = 1
        self.free_block_count += len(cmd.blocks)
        cmd.blocks = []
        if cmd.cmd_id:
            self.commands.pop(cmd.cmd_id, None)
            self._release_id(cmd.cmd_id)

    def _release_id(self, cmd_id: int) -> None:
        heapq.heappush(self.free_ids, cmd_id)

    def _finish(self, cmd: SimCommand, res: SimResult) -> None:
        self.stats["completed"] += 1
        cmd.on_done(res)

    # -- completion walk (tcmu_handle_completions) ---------------------------------------
    def handle_completions(self) -> int:
        with self.lock:
            self._plugged = True
            try:
                return self._handle_completions()
            finally:
                self._plugged = False
                if self._notify_pending:
                    self._notify_pending = False
                    self._notify()

    def _handle_completions(self) -> int:
        if True:
            if self.broken:
                return 0
            mm = self.mm
            size = self.cmdr_size
            tail = self._mb32[abi.MB_CMD_TAIL_OFF // 4]
            if tail >= size:
                self._break(f"cmd_tail {tail} outside the ring")
                return 0
            done = 0
            freed = False
            while self.last_cleaned != tail:
                ent = abi.CMDR_OFF + self.last_cleaned
                len_op, cmd_id, _kf, uflags = _HDR.unpack_from(mm, ent)
                op = len_op & abi.OP_MASK
                ln = len_op & ~abi.OP_MASK
                if ln == 0 or ln > size - self.last_cleaned:
                    self._break(f"entry length {ln} at {self.last_cleaned}")
                    return done
                freed = True
                if op in (abi.OP_PAD, abi.OP_TMR):
                    self.last_cleaned = (self.last_cleaned + ln) % size
                    continue
                cmd = self.commands.pop(cmd_id, None)
                if cmd is None:
                    self._break(f"cmd_id {cmd_id} not found, ring is broken")
                    return done
                status, read_len = _RSP.unpack_from(mm, ent + 8)
                sense = bytes(mm[ent + abi.RSP_SENSE_OFF : ent + abi.RSP_SENSE_OFF + 96])
                self.last_cleaned = (self.last_cleaned + ln) % size
                done += 1
                if uflags & abi.UFLAG_UNKNOWN_OP:
                    res = SimResult(CHECK_CONDITION, _SENSE_INVALID_CDB, b"")
                elif cmd.aborted:
                    res = SimResult(TASK_ABORTED, b"", b"")
                else:
                    data = b""
                    if cmd.data_in_len and cmd.data_out is None:
                        n = cmd.data_in_len
                        if uflags & abi.UFLAG_READ_LEN and 0 < read_len < n:
                            n = read_len
                        data = self._copy_in(cmd, n)
                    sl = _sense_len(sense) if status == CHECK_CONDITION else 0
                    res = SimResult(status, sense[:sl], data)
                if uflags & abi.UFLAG_KEEP_BUF:
                    self.kept[cmd.cmd_id] = cmd
                    self.stats["kept"] += 1
                else:
                    self._free_cmd(cmd)
                if not cmd.aborted:
                    self._finish(cmd, res)
            if freed:
                self._run_qfull()
            return done

    def _break(self, why: str) -> None:
        self.broken = True
        self.broken_reason = why
        self.stats["broken"] += 1

    def _run_qfull(self) -> None:
        if self.blocked:
            return
        while self.tmr_queue:
            ttype, ids = self.tmr_queue[0]
            if not self._try_queue_tmr(ttype, ids):
                return
            self.tmr_queue.popleft()
        while self.qfull:
            cmd = self.qfull[0]
            if self.broken:
                self.qfull.popleft()
                self._finish(cmd, SimResult(CHECK_CONDITION, _SENSE_LUN_COMM_FAILURE, b""))
                continue
            if not self._try_queue(cmd):
                return
            self.qfull.popleft()

    # -- control: the configfs actions and attributes --------------------------------------
    def block_dev(self, on: bool) -> None:
        with self.lock:
            self.blocked = on
            if not on:
                self._run_qfull()

    def reset_ring(self, err_level: int = 1) -> None:
        """action/reset_ring: fail in-flight commands (BUSY or CHECK CONDITION), zero the indices."""
        with self.lock:
            for cmd in list(self.commands.values()):
                self.commands.pop(cmd.cmd_id, None)
                if not cmd.aborted:
                    st = BUSY if err_level == 1 else CHECK_CONDITION
                    self._finish(cmd, SimResult(st, b"", b""))
                self._free_cmd(cmd)
            for cmd in list(self.kept.values()):
                self._free_cmd(cmd)
            self.kept.clear()
            self._mb32[abi.MB_CMD_TAIL_OFF // 4] = 0
            self._set_head(0)
            self.head = 0
            self.last_cleaned = 0
            self.tmr_queue.clear()
            self.broken = False
            self._run_qfull()

    def free_kept_buf(self, cmd_id: int) -> None:
        with self.lock:
            cmd = self.kept.pop(cmd_id, None)
            if cmd is not None:
                for b in cmd.blocks:
                    self.block_free[b] = 1
                self.free_block_count += len(cmd.blocks)
                cmd.blocks = []
                self._release_id(cmd_id)
                self._run_qfull()

    # -- task management -----------------------------------------------------------------
    def abort(self, cmds: list[SimCommand], tmr_type: int = abi.TMR_ABORT_TASK) -> None:
        """Abort commands: queued ones finish TASK ABORTED at once; ring ones are listed in
        a TMR entry (if tmr_notification) and their late completions are dropped."""
        with self.lock:
            ids: list[int] = []
            for cmd in cmds:
                if cmd in self.qfull:
                    self.qfull.remove(cmd)
                    self._finish(cmd, SimResult(TASK_ABORTED, b"", b""))
                elif cmd.cmd_id in self.commands:
                    cmd.aborted = True
                    ids.append(cmd.cmd_id)
                    self._finish(cmd, SimResult(TASK_ABORTED, b"", b""))
            # a TMR waits behind earlier ones; otherwise it goes in now if it fits
            if self.tmr_notification and (self.tmr_queue or not self._try_queue_tmr(tmr_type, ids)):
                self.tmr_queue.append((tmr_type, ids))

    def lun_reset(self) -> None:
        with self.lock:
            self.abort(list(self.qfull) + list(self.commands.values()), abi.TMR_LUN_RESET)

    def _try_queue_tmr(self, tmr_type: int, ids: list[int]) -> bool:
        size = self.cmdr_size
        tmr_size = abi.tmr_entry_size(len(ids))
        head = self.head
        to_end = size - head
        needed = tmr_size if to_end >= tmr_size else tmr_size + to_end
        if size - (head - self.last_cleaned) % size - 1 < needed:
            return False
        mm = self.mm
        if to_end < tmr_size:
            _HDR.pack_into(mm, abi.CMDR_OFF + head, to_end | abi.OP_PAD, 0, 0, 0)
            head = 0
        ent = abi.CMDR_OFF + head
        mm[ent : ent + tmr_size] = bytes(tmr_size)
        _HDR.pack_into(mm, ent, tmr_size | abi.OP_TMR, 0, 0, 0)
        mm[ent + abi.TMR_TYPE_OFF] = tmr_type
        _U32.pack_into(mm, ent + abi.TMR_CMD_CNT_OFF, len(ids))
        for i, cid in enumerate(ids):
            _U16.pack_into(mm, ent + abi.TMR_CMD_IDS_OFF + 2 * i, cid)
        self.head = (head + tmr_size) % size
        self._set_head(self.head)
        self._notify()
        return True

    # -- raw access for byte-level tests ----------------------------------------------------
    def write_raw_entry(self, raw: bytes) -> None:
        """Publish arbitrary bytes as the next entry (malformed-entry tests)."""
        with self.lock:
            ent = abi.CMDR_OFF + self.head
            self.mm[ent : ent + len(raw)] = raw
            self.head = (self.head + max(8, abi.round_up(len(raw), 8))) % self.cmdr_size
            self._set_head(self.head)
            self._notify()

    def close(self) -> None:
        self.stop()
        self.kernel_sock.close()
        self.user_sock.close()
        self._mb32.release()
        with contextlib.suppress(BufferError):
            self.mm.close()
        os.close(self.memfd)
