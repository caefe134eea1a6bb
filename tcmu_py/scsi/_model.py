"""The contract between the pure SCSI layer and the device engine (sans-IO).

``scsi.dispatch(cdb, iov, data_len, dev)`` never performs I/O.  It answers with one of:

* a :class:`Result` -- the command is finished (emulated in memory, or an error);
* an I/O request (:class:`Read`, :class:`Write`, :class:`Flush`, ...) -- the common
  single-step commands (READ/WRITE/SYNCHRONIZE CACHE); the engine runs it on the
  handler and completes the command GOOD, or with the sense its error maps to;
* a generator -- compound commands (COMPARE AND WRITE, VERIFY, WRITE SAME emulation,
  UNMAP, EXTENDED COPY, FORMAT UNIT ...).  It yields I/O requests, receives each
  request's result through ``send()`` (the bytes read, for a ``Read`` with
  ``bufs=None``; else ``None``), has handler errors thrown into it as
  :class:`SenseError`, and finally returns a :class:`Result`.

The engine owns threads, ordering and the ring; this layer owns SCSI semantics.  Tests
drive it with an in-memory block store and bytes in, bytes out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple


class Sam(IntEnum):
    """SAM-5 status codes (the byte the kernel forwards to the initiator)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    """SPC-4 Table 48 sense keys."""

    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


class Result(NamedTuple):
    """A finished command: SAM status, sense bytes (CHECK CONDITION only), data-in.

    ``data`` is what the device would transfer if the initiator's buffer were large
    enough; the engine copies ``min(len(data), buffer)`` bytes and, when that is less
    than the buffer, reports READ_LEN so the kernel sets the residual (§1.10).
    """

    status: int
    sense: bytes = b""
    data: bytes | bytearray | memoryview | None = None


GOOD = Result(Sam.GOOD)


class SenseError(Exception):
    """An error that already knows its SCSI answer (raised by handlers or the engine).

    ``info`` fills the INFORMATION field (e.g. the miscompare offset), ``field`` is a
    sense-key-specific field pointer ``(byte, bit or None, in_cdb)``, ``progress`` a
    sense-key-specific progress indication (0..65535, NOT READY / FORMAT IN PROGRESS).
    """

    def __init__(
        self,
        key: int,
        asc: int,
        ascq: int = 0,
        *,
        info: int | None = None,
        field: tuple[int, int | None, bool] | None = None,
        status: int = Sam.CHECK_CONDITION,
        message: str = "",
        progress: int | None = None,
    ) -> None:
        super().__init__(message or f"sense {key:#x}/{asc:#04x}/{ascq:#04x}")
        self.key = key
        self.asc = asc
        self.ascq = ascq
        self.info = info
        self.field = field
        self.status = status
        self.progress = progress


# ---- I/O requests: each maps 1:1 onto a handler method -------------------------------
# Offsets and lengths are in bytes.  ``dev`` is None for this device, or another
# DeviceState (EXTENDED COPY between devices of this runner).


class Read(NamedTuple):
    offset: int
    length: int
    bufs: Sequence[memoryview] | None  # None: the engine reads into a new buffer and send()s it
    dev: Any = None


class Write(NamedTuple):
    offset: int
    length: int
    bufs: Sequence[memoryview | bytes | bytearray]
    fua: bool = False
    dev: Any = None


class Flush(NamedTuple):
    dev: Any = None


class Unmap(NamedTuple):
    """Deallocate; reads afterwards return zeroes only if ``Caps.lbprz``."""

    offset: int
    length: int
    dev: Any = None


class WriteSame(NamedTuple):
    """Native WRITE SAME (only requested when ``Caps.write_same``).

    ``unmap`` passes on the initiator's UNMAP bit (only when ``Caps.unmap``): the handler
    may deallocate instead of writing, but only where reads then return ``pattern``.
    """

    offset: int
    length: int
    pattern: bytes  # exactly one logical block
    unmap: bool = False
    dev: Any = None


class CompareAndWrite(NamedTuple):
    """Native COMPARE AND WRITE (only requested when ``Caps.caw``); the handler raises
    SenseError(MISCOMPARE, 0x1D, info=byte offset) on mismatch."""

    offset: int
    compare: bytes
    write: bytes
    dev: Any = None


class GetLbaStatus(NamedTuple):
    """Ask the handler which extents from ``offset`` on are mapped (only requested when
    ``Caps.get_lba_status``; handler method ``get_lba_status(offset, length)``).

    The result sent back is a sequence of ``(offset, length, status)`` extents in bytes,
    in ascending order, the first starting at ``offset``; status 0 mapped (or unknown),
    1 deallocated, 2 anchored (SBC-3 GET LBA STATUS, PROVISIONING STATUS).  ``length`` is how far
    the initiator asked (to the end of the device); the handler may describe less.
    """

    offset: int
    length: int
    dev: Any = None


class Background(NamedTuple):
    """Run a generator detached from the command (FORMAT UNIT with IMMED)."""

    gen: Generator[Any, Any, Result]


IoRequest = (
    Read | Write | Flush | Unmap | WriteSame | CompareAndWrite | GetLbaStatus | Background
)
Compound = Generator[IoRequest, Any, Result]
Outcome = Result | Read | Write | Flush | Compound


# ---- what the emulation knows about a device -------------------------------------------


@dataclass(frozen=True)
class Caps:
    """Handler capabilities, discovered once at load (``can_*`` = the method exists)."""

    flush: bool = False
    unmap: bool = False
    write_same: bool = False  # native write_same; else emulated with Write requests
    caw: bool = False  # native compare_and_write; else read-compare-write
    lbprz: bool = False  # unmapped blocks read back as zeroes
    get_lba_status: bool = False
    fua: bool = False  # native FUA writes; else the engine flushes after a FUA write
    readonly: bool = False


@dataclass
class AluaGroup:
    """One target port group, as the control plane reads it from configfs (§2.8)."""

    group_id: int
    state: int  # 0 AO, 1 AN, 2 Standby, 3 Unavailable, 0xe Offline, 0xf Transitioning
    supported: int = 0x0F  # the supported-states bits of RTPG
    status: int = 0
    preferred: bool = False
    rel_port_ids: tuple[int, ...] = ()


@dataclass
class DeviceState:
    """Everything the emulation reads (and the little it writes) about one device."""

    name: str
    cfgstring: str  # the kernel's dev_config, "<subtype>/<handler cfg>"
    block_size: int
    num_lbas: int
    max_xfer_len: int = 128  # blocks (configfs hw_max_sectors)
    unit_serial: str = ""  # configfs wwn/vpd_unit_serial
    write_cache: bool = False  # WCE, configfs emulate_write_cache / handler
    solid_state: bool = False
    caps: Caps = field(default_factory=Caps)
    # ALUA (None: no ALUA groups known; TPGS reported as 0 unless implicit)
    alua_groups: list[AluaGroup] = field(default_factory=list)
    alua_implicit: bool = False
    alua_explicit: bool = False
    local_group_id: int | None = None
    rel_port_id: int | None = None
    # unmap / write-same limits (VPD 0xB0)
    max_unmap_lbas: int = 32 * 1024 * 1024
    max_unmap_descs: int = 256
    unmap_granularity: int = 1
    unmap_alignment: int = 0
    max_write_same_lbas: int = 0xFFFFFFFF
    # READ CAPACITY (16): logical blocks per physical block, as a power of two
    lbppbe: int = 0
    # mutable emulation state
    pending_ua: deque[tuple[int, int]] = field(default_factory=deque)  # (asc, ascq)
    format_progress: int | None = None  # 0..65536 while FORMAT UNIT runs
    mode_overrides: dict[tuple[int, int], int] = field(default_factory=dict)  # (page, byte) -> value
    last_sense: bytes = b""  # for REQUEST SENSE after a deferred error (optional)
    # resolve another device of this runner by its NAA designator (EXTENDED COPY)
    lookup_by_naa: Callable[[bytes], DeviceState | None] | None = None
    logged_opcodes: set[int] = field(default_factory=set)  # unsupported opcodes logged once

    @property
    def size(self) -> int:
        return self.num_lbas * self.block_size
