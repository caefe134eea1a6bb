"""SCSI emulation: a complete SBC-3/SPC-4 block device as a pure, sans-IO layer.

``dispatch(cdb, iov, data_len, dev)`` answers a command with a finished ``Result``, a
single I/O request (``Read``/``Write``/``Flush``) or a generator of requests for a
compound command (see ``_model``).  Everything else here is the vocabulary around it:
the one status -> sense table, sense encoders, the errno mapping used at the handler
boundary, unit attentions, and the literal opcode table itself.
"""

from ._dispatch import dispatch
from ._inquiry import naa_from_serial, naa_identifier
from ._model import (
    GOOD,
    AluaGroup,
    Background,
    Caps,
    CompareAndWrite,
    Compound,
    DeviceState,
    Flush,
    GetLbaStatus,
    IoRequest,
    Outcome,
    Read,
    Result,
    Sam,
    SenseError,
    SenseKey,
    Unmap,
    Write,
    WriteSame,
)
from ._sense import (
    STATUS_SENSE,
    Status,
    add_unit_attention,
    build_sense,
    check_condition,
    errno_to_sense,
    error_result,
    fail,
    sense_for,
)
from ._table import TABLE, is_served

# Unit attentions the engine raises (SPC-4 Annex D): after a resize, after a LUN reset.
UA_CAPACITY_CHANGED = (0x2A, 0x09)
UA_RESET_OCCURRED = (0x29, 0x00)

__all__ = [
    "GOOD",
    "STATUS_SENSE",
    "TABLE",
    "UA_CAPACITY_CHANGED",
    "UA_RESET_OCCURRED",
    "AluaGroup",
    "Background",
    "Caps",
    "CompareAndWrite",
    "Compound",
    "DeviceState",
    "Flush",
    "GetLbaStatus",
    "IoRequest",
    "Outcome",
    "Read",
    "Result",
    "Sam",
    "SenseError",
    "SenseKey",
    "Status",
    "Unmap",
    "Write",
    "WriteSame",
    "add_unit_attention",
    "build_sense",
    "check_condition",
    "dispatch",
    "errno_to_sense",
    "error_result",
    "fail",
    "is_served",
    "naa_from_serial",
    "naa_identifier",
    "sense_for",
]
