"""The device engine: drains each ring, runs commands through the SCSI layer and the
handler, and completes them -- one wakeup write per batch.

One asyncio loop thread owns every ring (style.md §7).  Per device it:
* drains the ring on each notification and dispatches every command;
* runs the handler according to its thread model -- ``inline`` in the loop thread,
  ``threads`` on a per-device pool (results hop back with ``call_soon_threadsafe``),
  ``async`` through an awaitable;
* drives compound commands (generators from the SCSI layer) step by step;
* maps handler errors at one boundary (SenseError / errno / anything else);
* tracks in-flight commands for TMR, timeouts and a clean stop.

The hot path (READ/WRITE on an inline handler) does no logging and no copies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Generator
from typing import Any

from tcmu_py import abi
from tcmu_py.handler import implemented
from tcmu_py.logs import device_logger
from tcmu_py.metrics import HIST_BUCKETS, DeviceMetrics, bucket_of
from tcmu_py.ring import Command, MalformedEntry, Ring, TmrEntry
from tcmu_py.scsi import _model as m

log = logging.getLogger("tcmu_py.engine")

__all__ = ["Device", "Engine"]

_HW_ERROR = m.SenseError(m.SenseKey.HARDWARE_ERROR, 0x44, 0x00)
#: errors that mean "the backing store went away", not "this command failed": they start
#: the recovery state machine (tcmu-runner's connection-lost handling, §2.8)
RECOVER_ERRNOS = frozenset(
    {errno.ESHUTDOWN, errno.ENOTCONN, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE}
)
_BACKOFF_MAX_S = 30.0
_BUSY = m.Result(m.Sam.BUSY)
_CAW_OPCODE = 0x89
#: "ring full": less free than this (or 1/64 of the ring) at a drain -- the kernel then
#: cannot place another command and queues it (qfull, reference/tcmu.md §1.6)
_RING_FULL_SLACK = 1024
_RING_FULL_MIN_CMDS = 8
_TMR_NAMES = {
    abi.TMR_ABORT_TASK: "ABORT_TASK", abi.TMR_ABORT_TASK_SET: "ABORT_TASK_SET",
    abi.TMR_CLEAR_ACA: "CLEAR_ACA", abi.TMR_CLEAR_TASK_SET: "CLEAR_TASK_SET",
    abi.TMR_LUN_RESET: "LUN_RESET", abi.TMR_TARGET_WARM_RESET: "TARGET_WARM_RESET",
    abi.TMR_TARGET_COLD_RESET: "TARGET_COLD_RESET", abi.TMR_LUN_RESET_PRO: "LUN_RESET_PRO",
}
#: no entry is assumed larger than this (a command of 1000 iovecs): a ring holding fewer
#: than cmdr_size / this entries cannot be full, and is not looked at
_ENTRY_MAX = 16 * 1024


def _sense_bytes(err: m.SenseError) -> bytes:
    from tcmu_py.scsi import sense_for

    return sense_for(err)


_WRITE_SIDE = frozenset({"write", "write_same", "compare_and_write", "unmap", "flush"})


def _map_exception(exc: BaseException, what: str = "") -> m.SenseError | None:
    """The one handler-error boundary: None means 'unexpected' (HARDWARE ERROR + log).

    ``what`` names the handler callback, so EIO becomes a read or a write error."""
    if isinstance(exc, m.SenseError):
        return exc
    if isinstance(exc, OSError) and exc.errno:
        from tcmu_py.scsi import errno_to_sense

        return errno_to_sense(exc.errno, write=what in _WRITE_SIDE)
    return None


class Device:
    """One served device: its ring, handler instance and SCSI state."""

    def __init__(
        self,
        engine: Engine,
        ring: Ring,
        state: m.DeviceState,
        handler: Any,
        *,
        thread_model: str = "inline",
        threads: int = 1,
        on_corrupt: Callable[[Device], None] | None = None,
    ) -> None:
        self.engine = engine
        self.loop = engine.loop
        self.ring = ring
        self.state = state
        self.handler = handler
        self.name = state.name
        self.thread_model = thread_model
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        if thread_model == "threads":
            self.pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, threads), thread_name_prefix=f"tcmu-{state.name}"
            )
        self.inflight: dict[int, Command] = {}
        self.on_corrupt = on_corrupt
        self.runner_opts: dict[str, Any] = {}
        #: re-reads configfs wwn/vpd_unit_serial: rtslib writes it only after enable, i.e.
        #: after we attached, so an empty serial is looked up again on INQUIRY until set
        self.refresh_serial: Callable[[], str] | None = None
        self._serial_pending = False
        self.blocked = False  # recovery: answer BUSY instead of calling the handler
        self.closing = False
        self._flush_scheduled = False
        self._caw_busy = False
        self._caw_waiting: list[tuple[Command, Generator[Any, Any, m.Result]]] = []
        self._logged: set[tuple[str, str]] = set()
        self._dispatch = _import_dispatch()
        self.counters = {
            "commands": 0, "batches": 0, "errors": 0, "malformed": 0, "tmr": 0,
            "recoveries": 0, "timeouts": 0,
        }
        self.info: Any = None  # the handler's DeviceInfo, for reopen during recovery
        self.recovering = False
        self.cmd_time_out = 0.0  # ;tcmur_cmd_time_out=N; (0: off)
        self._drained_event = asyncio.Event()
        #: plain READ/WRITE served in C from the medium the handler lent (native_acquire)
        self.native = False
        self.native_gate_hold = False
        self.threads = threads
        #: None with --no-metrics: the hot path then skips every count but the dict above
        self.metrics: DeviceMetrics | None = DeviceMetrics() if engine.metrics_enabled else None
        self._batch_t0 = 0.0  # time.monotonic() of the current batch's fetch (metrics)
        self._ring_full_min = max(_RING_FULL_MIN_CMDS, ring.cmdr_size // _ENTRY_MAX)
        self.log = device_logger(log, self.name, getattr(type(handler), "subtype", "?"))

    # -- the ring -------------------------------------------------------------------------
    def on_ready(self) -> None:
        """Loop callback on a ring notification: drain everything, then one wakeup."""
        ring = self.ring
        ring.ack()
        if self.native:
            st = self.state
            ring.native_gate(
                not (st.pending_ua or st.format_progress is not None or self.blocked
                     or self.closing or self.native_gate_hold)
            )
        mt = self.metrics
        if mt is not None:
            t0 = self._batch_t0 = time.monotonic()  # one clock read per batch
            pending0 = len(self.inflight)
        entries = ring.drain()
        served = ring.native_served
        if served:
            self.counters["commands"] += served
            if not entries:
                self.counters["batches"] += 1
        nspecial = 0  # TMR and malformed entries: not commands
        if mt is not None:
            # in the ring at this drain: what the handler and the C workers still hold, and
            # this batch; the peak, and the ring's fill (before this batch's completions
            # free it) -- one C call, only when that many entries could fill the ring
            held = pending0 + len(entries) + (ring.native_inflight if ring.native_efd >= 0 else served)
            if held > mt.inflight_peak:
                mt.inflight_peak = held
            if held >= self._ring_full_min:
                size = ring.cmdr_size
                if size - ring.inflight_bytes() - 1 < max(_RING_FULL_SLACK, size >> 6):
                    mt.ring_full += 1
        if entries:
            self.counters["batches"] += 1
            self.counters["commands"] += len(entries)
            dispatch, state, handle = self._dispatch, self.state, self._handle
            if mt is not None:
                ops, op_bytes = mt.ops, mt.op_bytes
            for ent in entries:
                if type(ent) is Command:
                    if mt is not None:
                        op = ent.cdb[0]
                        ops[op] += 1
                        op_bytes[op] += ent.data_len
                    if self._serial_pending and ent.cdb[0] == 0x12:
                        self._refresh_serial()
                    handle(ent, dispatch(ent.cdb, ent.iov, ent.data_len, state))
                elif type(ent) is TmrEntry:
                    nspecial += 1
                    self._tmr(ent)
                else:
                    assert isinstance(ent, MalformedEntry)
                    nspecial += 1
                    self._malformed(ent)
        elif ring.corrupt:
            self._corrupt()
        ring.flush()
        if mt is not None and entries:
            # completed in this batch = fetched minus those now waiting on threads/async;
            # their completions reached the kernel at the flush just done
            done = len(entries) - nspecial - (len(self.inflight) - pending0)
            if done > 0:
                b = int((time.monotonic() - t0) * 1e6).bit_length()  # metrics.bucket_of, inlined
                mt.hist[b if b < HIST_BUCKETS else HIST_BUCKETS - 1] += done

    # -- the native data path ----------------------------------------------------------------
    def native_acquire(self) -> bool:
        """Give the ring the handler's medium if it lends one (:func:`native_medium`):
        memory is copied in the batch, an fd is served by C worker threads.

        Called after open, reopen and reconfig; :meth:`native_release` (or
        :meth:`native_quiesce`) must come before the handler closes or changes it."""
        self.native_release()
        kind, medium = native_medium(self.handler)
        if kind is None:
            return False
        st = self.state
        geo = (st.block_size, st.num_lbas, st.max_xfer_len, st.caps.readonly)
        if kind == "memory":
            self.native = self.ring.attach_native(medium, *geo)
            if not self.native:
                self.log.warning("%s: the handler's memory is smaller than the device; native path off",
                            self.name)
            return self.native
        fd, write_through = medium
        try:
            efd = self.ring.attach_native_fd(fd, max(1, self.threads), write_through, *geo)
        except OSError as e:
            self.log.warning("%s: native I/O threads unavailable (%s); serving through Python",
                        self.name, e)
            return False
        self.loop.add_reader(efd, self._on_native_done)
        self.native = True
        return True

    def native_release(self) -> None:
        """Take the medium back now.  With fd jobs still running this waits for them
        (it joins the workers): await :meth:`native_quiesce` instead where possible."""
        if not self.native:
            return
        self.native = False
        efd = self.ring.native_efd
        if efd >= 0:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(efd)
        self._native_failed(self.ring.native_detach())
        self.ring.flush()

    async def native_quiesce(self, timeout: float = 30.0) -> None:
        """Stop giving commands to the native path, wait for its fd jobs, release it."""
        if not self.native:
            return
        self.ring.native_gate(False)
        self.native_gate_hold = True
        try:
            deadline = self.loop.time() + timeout
            while self.ring.native_inflight and self.loop.time() < deadline:
                await asyncio.sleep(0.002)
            if self.ring.native_inflight:
                self.log.warning("%s: %d native I/O(s) still running after %.0f s; waiting for them",
                            self.name, self.ring.native_inflight, timeout)
            self.native_release()
        finally:
            self.native_gate_hold = False

    def _on_native_done(self) -> None:
        """Loop callback: fd jobs finished -- complete them, one wakeup for all."""
        ring = self.ring
        fails = ring.native_reap()
        if fails:
            self._native_failed(fails)
        ring.flush()
        if self.closing and not self.inflight and not ring.native_inflight:
            self._drained_event.set()

    def _native_failed(self, fails: list[tuple[int, int, bool]]) -> None:
        mt = self.metrics
        for cmd_id, err, write in fails:
            what = "write" if write else "read"
            if mt is not None:  # C counts only its successes; bytes are not known here
                mt.ops[0x2A if write else 0x28] += 1
            self._fail(Command(cmd_id, b"", [], 0), OSError(err, os.strerror(err)), what)

    def set_serial_source(self, read: Callable[[], str]) -> None:
        self.refresh_serial = read
        self._serial_pending = not self.state.unit_serial

    def _refresh_serial(self) -> None:
        assert self.refresh_serial is not None
        try:
            serial = self.refresh_serial()
        except OSError:
            return
        if serial:
            self.state.unit_serial = serial
            self._serial_pending = False

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.ring.flush()

    # -- dispatch ---------------------------------------------------------------------------
    def _handle(self, cmd: Command, out: Any) -> None:
        t = type(out)
        if t is m.Result:
            self._complete(cmd, out)
        elif self.blocked:
            self._complete(cmd, _BUSY)
        elif t is m.Read:
            if self.thread_model == "inline":
                try:
                    self.handler.read(out.offset, out.length, out.bufs)
                except BaseException as exc:  # noqa: BLE001 - a boundary: every failure is answered, never raised
                    self._fail(cmd, exc, "read")
                    return
                self.ring.complete(cmd.cmd_id, 0)
            else:
                self._submit(cmd, out, self._io_done)
        elif t is m.Write:
            if self.thread_model == "inline" and not (out.fua and not self.state.caps.fua):
                try:
                    self.handler.write(out.offset, out.length, out.bufs, out.fua)
                except BaseException as exc:  # noqa: BLE001 - a boundary: every failure is answered, never raised
                    self._fail(cmd, exc, "write")
                    return
                self.ring.complete(cmd.cmd_id, 0)
            elif out.fua and not self.state.caps.fua:
                self._run_gen(cmd, _write_then_flush(out, self.state.caps.flush), None, None)
            else:
                self._submit(cmd, out, self._io_done)
        elif t is m.Flush:
            self._submit(cmd, out, self._io_done)
        elif isinstance(out, Generator):
            if cmd.cdb[0] == _CAW_OPCODE:
                if self._caw_busy:
                    self._caw_waiting.append((cmd, out))
                    return
                self._caw_busy = True
            self._run_gen(cmd, out, None, None)
        else:
            self._fail(cmd, TypeError(f"SCSI layer returned {out!r}"), "dispatch")

    def _io_done(self, cmd: Command, value: Any, exc: BaseException | None, what: str) -> None:
        if exc is None:
            self._complete(cmd, m.GOOD)
        else:
            self._fail(cmd, exc, what)

    # -- running requests on the handler ---------------------------------------------------
    def _call(self, req: Any) -> tuple[Callable[..., Any], tuple[Any, ...], str]:
        """Map an I/O request onto (handler method, args, name)."""
        h = self.handler
        if req.dev is not None:
            h = self.engine.handler_for(req.dev)
        t = type(req)
        if t is m.Read:
            if req.bufs is None:
                buf = bytearray(req.length)
                return _read_into(h, buf), (req.offset, req.length, [memoryview(buf)]), "read"
            return h.read, (req.offset, req.length, req.bufs), "read"
        if t is m.Write:
            return h.write, (req.offset, req.length, req.bufs, req.fua), "write"
        if t is m.Flush:
            return h.flush, (), "flush"
        if t is m.Unmap:
            return h.unmap, (req.offset, req.length), "unmap"
        if t is m.WriteSame:
            return h.write_same, (req.offset, req.length, req.pattern, req.unmap), "write_same"
        if t is m.CompareAndWrite:
            return h.compare_and_write, (req.offset, req.compare, req.write), "compare_and_write"
        if t is m.GetLbaStatus:
            return h.get_lba_status, (req.offset, req.length), "get_lba_status"
        extra = getattr(h, "handle_request", None)
        if extra is not None:
            return extra, (req,), type(req).__name__
        raise TypeError(f"unknown request {req!r}")

    def _submit(
        self,
        cmd: Command,
        req: Any,
        done: Callable[[Command, Any, BaseException | None, str], None],
    ) -> None:
        """Run one request per the thread model; ``done`` always runs in the loop thread."""
        try:
            fn, args, what = self._call(req)
        except BaseException as exc:  # noqa: BLE001 - a boundary: every failure is answered, never raised
            done(cmd, None, exc, "dispatch")
            return
        model = self.thread_model
        if model == "inline":
            try:
                value = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - a boundary: every failure is answered, never raised
                done(cmd, None, exc, what)
                return
            done(cmd, value, None, what)
            return
        self.inflight[cmd.cmd_id] = cmd
        if not cmd.t_fetch and (self.metrics is not None or self.cmd_time_out):
            # a compound command keeps the time of its first step's fetch
            cmd.t_fetch = self._batch_t0 if self.metrics is not None else time.monotonic()
        loop = self.loop
        if model == "threads":
            assert self.pool is not None
            fut = self.pool.submit(fn, *args)

            def _back(f: concurrent.futures.Future[Any]) -> None:
                loop.call_soon_threadsafe(self._resolved, cmd, f, done, what)

            fut.add_done_callback(_back)
            return
        try:
            aw = fn(*args)
            afut = asyncio.ensure_future(aw, loop=loop)
        except BaseException as exc:  # noqa: BLE001 - a boundary: every failure is answered, never raised
            self.inflight.pop(cmd.cmd_id, None)
            done(cmd, None, exc, what)
            return
        afut.add_done_callback(lambda f: self._resolved(cmd, f, done, what))

    def _resolved(self, cmd: Command, fut: Any, done: Callable[..., None], what: str) -> None:
        if self.inflight.get(cmd.cmd_id) is not cmd:
            # already answered (stop or recovery failed it), its id maybe reused by a newer
            # command that is in flight now: drop the late result, leave the newer one alone
            return
        del self.inflight[cmd.cmd_id]
        exc = fut.exception()
        done(cmd, None if exc else fut.result(), exc, what)
        mt = self.metrics
        if mt is not None and cmd.cmd_id not in self.inflight:  # finished, not a next step
            mt.hist[bucket_of(int((time.monotonic() - cmd.t_fetch) * 1e6))] += 1
        self._schedule_flush()
        if self.closing and not self.inflight:
            self._drained_event.set()

    # -- compound commands -----------------------------------------------------------------
    def _run_gen(
        self,
        cmd: Command,
        gen: Generator[Any, Any, m.Result],
        value: Any,
        exc: BaseException | None,
        what: str = "compound",
    ) -> None:
        """Drive a compound command: each yielded request runs on the handler, its result
        (or its failure, mapped to sense) goes back into the generator.  ``what`` is the
        handler callback that failed, so errors are logged and mapped under its name."""
        while True:
            try:
                if exc is not None:
                    mapped = _map_exception(exc, what)
                    req = gen.throw(mapped if mapped is not None else exc)
                else:
                    req = gen.send(value)
            except StopIteration as stop:
                self._gen_finished(cmd, stop.value if stop.value is not None else m.GOOD)
                return
            except BaseException as err:  # noqa: BLE001 - a boundary: every failure is answered, never raised
                self._gen_finished(cmd, None, err, what)
                return
            value, exc = None, None
            if type(req) is m.Background:
                self.engine.spawn_background(self, req.gen)
                continue
            if self.thread_model == "inline" and req.dev is None:
                try:
                    fn, args, what = self._call(req)
                    value = fn(*args)
                except BaseException as err:  # noqa: BLE001 - a boundary: every failure is answered, never raised
                    exc = err
                continue

            def _resume(c: Command, v: Any, e: BaseException | None, w: str, g: Any = gen) -> None:
                self._run_gen(c, g, v, e, w)

            self._submit(cmd, req, _resume)
            return

    def _gen_finished(
        self, cmd: Command, res: m.Result | None, exc: BaseException | None = None,
        what: str = "compound",
    ) -> None:
        if res is not None:
            self._complete(cmd, res)
        else:
            assert exc is not None
            self._fail(cmd, exc, what)
        if cmd.cdb[0] == _CAW_OPCODE:
            if self._caw_waiting:
                nxt, g = self._caw_waiting.pop(0)
                self.loop.call_soon(self._run_gen, nxt, g, None, None)
            else:
                self._caw_busy = False

    # -- completion -------------------------------------------------------------------------
    def _complete(self, cmd: Command, res: m.Result) -> None:
        data = res.data
        read_len = 0
        if data is not None:
            n = _copy_to_iov(cmd.iov, data)
            if n < cmd.data_len:
                if n:
                    read_len = n  # the kernel copies only this much and sets the residual
                else:
                    # READ_LEN cannot say "zero bytes" (0 means "not set"), so the kernel
                    # will copy the whole buffer: make sure it holds no stale data.
                    for v in cmd.iov:
                        v[:] = bytes(len(v))
        if res.status != 0:
            self.counters["errors"] += 1
            if self.metrics is not None:
                self.metrics.error(res.status, res.sense)
        self.ring.complete(cmd.cmd_id, res.status, res.sense, read_len)

    def _fail(self, cmd: Command, exc: BaseException, what: str) -> None:
        if isinstance(exc, OSError) and exc.errno in RECOVER_ERRNOS and not self.closing:
            self.start_recovery(f"{what}: {exc.strerror or exc}", "conn_lost")
        err = _map_exception(exc, what)
        if err is None:
            key = (type(exc).__name__, what)
            if key not in self._logged:
                self._logged.add(key)
                self.log.error(
                    "%s: handler %s.%s raised %r; answering HARDWARE ERROR",
                    self.name,
                    type(self.handler).__name__,
                    what,
                    exc,
                )
            err = _HW_ERROR
        if err.status != m.Sam.CHECK_CONDITION:
            self._complete(cmd, m.Result(err.status))
        else:
            self._complete(cmd, m.Result(err.status, _sense_bytes(err)))

    # -- the unusual entries ----------------------------------------------------------------
    def _tmr(self, ent: TmrEntry) -> None:
        """TMR notification (§1.5): count and log it, mark the aborted commands.

        Nothing is completed early: the kernel answers the initiator only once every aborted
        command that is in the ring has been completed by us, and drops those results.  A
        handler call still running (a WRITE included) must finish first, so that no aborted
        command can change the medium after the abort was answered.  A LUN RESET needs no
        unit attention from us either: LIO's core queues 29/03 itself for every I_T nexus,
        and a second one (ours) would reach the initiator as a second reset."""
        self.counters["tmr"] += 1
        busy = 0
        for cid in ent.cmd_ids:
            c = self.inflight.get(cid)
            if c is not None:
                c.state = 1
                busy += 1
        log.info("%s: TMR %s: %d aborted command(s) in the ring, %d of them in the handler",
                 self.name, _TMR_NAMES.get(ent.tmr_type, f"type {ent.tmr_type}"),
                 len(ent.cmd_ids), busy)

    def _malformed(self, ent: MalformedEntry) -> None:
        self.counters["malformed"] += 1
        if ("malformed", ent.reason) not in self._logged:
            self._logged.add(("malformed", ent.reason))
            self.log.error("%s: malformed ring entry (cmd_id %d): %s", self.name, ent.cmd_id, ent.reason)
        self.ring.complete(ent.cmd_id, m.Sam.CHECK_CONDITION, b"", 0, abi.UFLAG_UNKNOWN_OP)

    def _corrupt(self) -> None:
        why = self.ring.corrupt
        if ("corrupt", str(why)) not in self._logged:
            self._logged.add(("corrupt", str(why)))
            r = self.ring
            self.log.error("%s: ring walk stopped: %s (fetch %d head %d tail %d); the ring needs "
                      "reset_ring", self.name, why, r.fetch, r.head, r.tail)
        if self.on_corrupt is not None:
            self.on_corrupt(self)

    # -- recovery -----------------------------------------------------------------------------
    def start_recovery(self, why: str, event: str) -> None:
        """Connection lost: answer BUSY (initiators retry), then close and reopen the
        handler with a bounded exponential back-off, then serve again.  One at a time."""
        if self.recovering:
            return
        self.recovering = True
        self.blocked = True
        self.counters["recoveries"] += 1
        self.log.warning("%s: %s; recovering (commands answered BUSY meanwhile)", self.name, why)
        self._report(event)
        self.engine.track(self.loop.create_task(self._recover()))

    def _report(self, event: str) -> None:
        report = getattr(self.handler, "report_event", None)
        if report is None:
            return
        try:
            report(event)
        except Exception as e:  # noqa: BLE001 - a status update must not stop recovery
            self.log.debug("%s: report_event(%s) failed: %r", self.name, event, e)

    async def _recover(self) -> None:
        await self.drain_inflight(10.0)
        self.closing = False
        self.fail_inflight(m.Sam.BUSY)
        delay = 1.0
        attempt = 0
        await self.native_quiesce()
        while self.name in self.engine.devices:
            attempt += 1
            try:
                await self.loop.run_in_executor(None, self.handler.close)
            except Exception as e:  # noqa: BLE001
                self.log.debug("%s: close during recovery: %r", self.name, e)
            try:
                await self.loop.run_in_executor(None, self.handler.open, self.info, True)
            except Exception as e:  # noqa: BLE001
                if attempt in (1, 2, 4) or attempt % 10 == 0:
                    self.log.error("%s: reopen attempt %d failed: %s; retrying in %.0f s",
                              self.name, attempt, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX_S)
                continue
            self.log.info("%s: recovered after %d attempt(s)", self.name, attempt)
            self.native_acquire()
            break
        self.blocked = False
        self.recovering = False

    def check_timeouts(self, now: float) -> None:
        """;tcmur_cmd_time_out=N;: a handler call older than N seconds is logged once and
        treated as a lost connection (tcmu-runner main.c:740-760)."""
        limit = self.cmd_time_out
        for cmd in self.inflight.values():
            if cmd.t_fetch and now - cmd.t_fetch > limit and cmd.state != 2:
                cmd.state = 2
                self.counters["timeouts"] += 1
                self.log.error("%s: command %#04x (id %d) in the handler for over %.0f s",
                          self.name, cmd.cdb[0], cmd.cmd_id, limit)
                self._report("cmd_timed_out")
                self.start_recovery("command timed out", "conn_lost")
                return

    # -- lifecycle --------------------------------------------------------------------------
    async def drain_inflight(self, timeout: float) -> bool:
        """Wait until every in-flight handler call has returned (True) or time ran out."""
        self.closing = True
        if not self.inflight and not self.ring.native_inflight:
            return True
        self._drained_event.clear()
        try:
            await asyncio.wait_for(self._drained_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def fail_inflight(self, status: int = m.Sam.BUSY) -> int:
        """Complete every in-flight command now (stop/recovery); late results are dropped."""
        n = 0
        for cmd in list(self.inflight.values()):
            self.inflight.pop(cmd.cmd_id, None)
            self.ring.complete(cmd.cmd_id, status)
            n += 1
            if self.metrics is not None:
                self.metrics.error(status, b"")
                if cmd.t_fetch:
                    self.metrics.hist[bucket_of(int((time.monotonic() - cmd.t_fetch) * 1e6))] += 1
        self.ring.flush()
        return n


def native_medium(handler: Any) -> tuple[str | None, Any]:
    """What ``handler`` lends for the native path: ("memory", buffer), ("fd", (fd,
    write_through)) or (None, None).

    A handler opts in with ``native_memory()`` or ``native_fd()`` (docs/handlers.md).  It
    is honoured only while ``read`` and ``write`` are the ones defined next to it: a
    subclass or a test that replaces them must see every command, so the path stays off."""
    cls = type(handler)
    have = implemented(cls)
    for method, kind in (("native_memory", "memory"), ("native_fd", "fd")):
        if method not in have:
            continue
        owner = next(c for c in cls.__mro__ if method in vars(c))
        for name in ("read", "write"):
            if name in vars(handler) or getattr(cls, name, None) is not getattr(owner, name, None):
                return None, None
        medium = getattr(handler, method)()
        return (kind, medium) if medium is not None else (None, None)
    return None, None


def _write_then_flush(req: m.Write, can_flush: bool) -> Generator[Any, Any, m.Result]:
    """FUA on a handler without native FUA: write, then flush (SBC-4 5.44: FUA=1 means
    the data must be on the medium before GOOD)."""
    yield m.Write(req.offset, req.length, req.bufs, False, req.dev)
    if can_flush:
        yield m.Flush(req.dev)
    return m.GOOD


def _read_into(h: Any, buf: bytearray) -> Callable[..., bytearray]:
    def _do(offset: int, length: int, bufs: list[memoryview]) -> bytearray:
        res = h.read(offset, length, bufs)
        if asyncio.isfuture(res) or asyncio.iscoroutine(res):
            async def _wait() -> bytearray:
                await res
                return buf

            return _wait()  # type: ignore[return-value]
        return buf

    return _do


def _copy_to_iov(iov: list[memoryview], data: Any) -> int:
    """Copy data-in into the command's buffers; returns the bytes copied."""
    src = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    n = len(src)
    pos = 0
    for v in iov:
        if pos >= n:
            break
        take = min(len(v), n - pos)
        v[:take] = src[pos : pos + take]
        pos += take
    return pos


def _import_dispatch() -> Callable[..., Any]:
    from tcmu_py.scsi import dispatch

    return dispatch


class Engine:
    """Owns the loop-side state of every device of this runner."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_event_loop()
        self.devices: dict[str, Device] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self.started = time.monotonic()
        #: devices attached from now on keep metrics (--no-metrics turns this off)
        self.metrics_enabled = True

    def track(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _tick(self) -> None:
        now = time.monotonic()
        for d in list(self.devices.values()):
            if d.cmd_time_out and d.inflight and not d.recovering:
                d.check_timeouts(now)
        self._ticker = self.loop.call_later(1.0, self._tick) if self.devices else None

    def add_device(self, dev: Device) -> Device:
        self.devices[dev.name] = dev
        if dev.cmd_time_out and self._ticker is None:
            self._ticker = self.loop.call_later(1.0, self._tick)
        self.loop.add_reader(dev.ring.fd, dev.on_ready)
        # commands may already be waiting (re-attach after a restart)
        self.loop.call_soon(dev.on_ready)
        return dev

    def detach(self, dev: Device) -> None:
        """Stop reading the ring (the device keeps its in-flight commands)."""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(dev.ring.fd)
        self.devices.pop(dev.name, None)

    def lookup_by_naa(self, naa: bytes) -> m.DeviceState | None:
        """EXTENDED COPY: find a device of this runner by its VPD 0x83 NAA designator."""
        from tcmu_py.scsi import naa_identifier

        for d in self.devices.values():
            if naa_identifier(d.state) == naa:
                return d.state
        return None

    def handler_for(self, state: m.DeviceState) -> Any:
        for d in self.devices.values():
            if d.state is state:
                return d.handler
        raise m.SenseError(m.SenseKey.COPY_ABORTED, 0x0D, 0x02, message="copy target gone")

    def spawn_background(self, dev: Device, gen: Generator[Any, Any, m.Result]) -> None:
        """Run a detached compound job (FORMAT UNIT) with the device's handler."""

        async def _run() -> None:
            value: Any = None
            exc: BaseException | None = None
            while True:
                try:
                    req = gen.throw(exc) if exc is not None else gen.send(value)
                except StopIteration:
                    return
                except BaseException as err:  # noqa: BLE001 - a boundary: every failure is answered, never raised
                    dev.log.error("%s: background job failed: %r", dev.name, err)
                    return
                value, exc = None, None
                try:
                    fn, args, _ = dev._call(req)
                    if dev.thread_model == "inline":
                        value = fn(*args)
                    elif dev.thread_model == "threads":
                        assert dev.pool is not None
                        value = await asyncio.wrap_future(dev.pool.submit(fn, *args))
                    else:
                        value = await fn(*args)
                except BaseException as err:  # noqa: BLE001 - a boundary: every failure is answered, never raised
                    exc = _map_exception(err) or err
                await asyncio.sleep(0)

        self.track(self.loop.create_task(_run()))
