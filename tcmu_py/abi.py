"""The target_core_user kernel ABI: constants and byte offsets of the shared mapping.

Everything here is transcribed from ``reference/tcmu.md`` §1 (the 6.1 UAPI header,
``include/uapi/linux/target_core_user.h``), so that the native shim, the ring layer and
the simulated kernel all agree on one layout.  Offsets are for 64-bit userspace only.
"""

from __future__ import annotations

import struct
from typing import Final

# §1.1 constants
TCMU_VERSION: Final = "2.0"
TCMU_MAILBOX_VERSION: Final = 2
ALIGN_SIZE: Final = 64

MB_FLAG_CAP_OOOC: Final = 1 << 0
MB_FLAG_CAP_READ_LEN: Final = 1 << 1
MB_FLAG_CAP_TMR: Final = 1 << 2
MB_FLAG_CAP_KEEP_BUF: Final = 1 << 3
MB_FLAGS_ALL: Final = MB_FLAG_CAP_OOOC | MB_FLAG_CAP_READ_LEN | MB_FLAG_CAP_TMR | MB_FLAG_CAP_KEEP_BUF

OP_PAD: Final = 0
OP_CMD: Final = 1
OP_TMR: Final = 2
OP_MASK: Final = 0x7
OP_ALIGN_SIZE: Final = 8

UFLAG_UNKNOWN_OP: Final = 0x1
UFLAG_READ_LEN: Final = 0x2
UFLAG_KEEP_BUF: Final = 0x4

SENSE_BUFFERSIZE: Final = 96

# enum tcmu_tmr_type
TMR_UNKNOWN: Final = 0
TMR_ABORT_TASK: Final = 1
TMR_ABORT_TASK_SET: Final = 2
TMR_CLEAR_ACA: Final = 3
TMR_CLEAR_TASK_SET: Final = 4
TMR_LUN_RESET: Final = 5
TMR_TARGET_WARM_RESET: Final = 6
TMR_TARGET_COLD_RESET: Final = 7
TMR_LUN_RESET_PRO: Final = 128

# §1.2 struct tcmu_mailbox (sizeof 128)
MB_VERSION_OFF: Final = 0  # u16
MB_FLAGS_OFF: Final = 2  # u16
MB_CMDR_OFF_OFF: Final = 4  # u32
MB_CMDR_SIZE_OFF: Final = 8  # u32
MB_CMD_HEAD_OFF: Final = 12  # u32
MB_CMD_TAIL_OFF: Final = 64  # u32, own cacheline
MAILBOX_SIZE: Final = 128
CMDR_OFF: Final = MAILBOX_SIZE

# §1.3 struct tcmu_cmd_entry_hdr (8 bytes)
HDR_SIZE: Final = 8
HDR: Final = struct.Struct("<IHBB")  # len_op, cmd_id, kflags, uflags

# §1.4 struct tcmu_cmd_entry (sizeof 112): request view
REQ_IOV_CNT_OFF: Final = 8
REQ_IOV_BIDI_CNT_OFF: Final = 12
REQ_IOV_DIF_CNT_OFF: Final = 16
REQ_CDB_OFF_OFF: Final = 24  # u64, absolute offset into the mapping
REQ_IOV_OFF: Final = 48  # struct iovec[] of (u64 base-offset, u64 len)
IOVEC_SIZE: Final = 16
CMD_ENTRY_SIZE: Final = 112
# response view (overwrites the request)
RSP_SCSI_STATUS_OFF: Final = 8  # u8
RSP_READ_LEN_OFF: Final = 12  # u32
RSP_SENSE_OFF: Final = 16  # 96 bytes

# §1.5 struct tcmu_tmr_entry
TMR_TYPE_OFF: Final = 8  # u8
TMR_CMD_CNT_OFF: Final = 12  # u32
TMR_CMD_IDS_OFF: Final = 32  # u16[]

# §1.9 defaults of a 6.x kernel
DEFAULT_CMD_RING_BYTES: Final = 8 * 1024 * 1024  # includes the mailbox
DEFAULT_CMDR_SIZE: Final = DEFAULT_CMD_RING_BYTES - CMDR_OFF
DEFAULT_DATA_AREA_BYTES: Final = 1024 * 1024 * 1024
DATA_BLOCK_SIZE: Final = 4096  # one page per block (data_pages_per_blk = 1)


def hdr_get_op(len_op: int) -> int:
    return len_op & OP_MASK


def hdr_get_len(len_op: int) -> int:
    return len_op & ~OP_MASK


def round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def cmd_entry_base_size(iov_cnt: int) -> int:
    """§1.6: max(offsetof(req.iov[iov_cnt]), sizeof(struct tcmu_cmd_entry))."""
    return max(REQ_IOV_OFF + IOVEC_SIZE * iov_cnt, CMD_ENTRY_SIZE)


def tmr_entry_size(cmd_cnt: int) -> int:
    return round_up(TMR_CMD_IDS_OFF + 2 * cmd_cnt, OP_ALIGN_SIZE)


def scsi_command_size(opcode: int, cdb7: int = 0) -> int:
    """Length of a CDB from its group code (the kernel's scsi_command_size()).

    Group 3 (0x60-0x7f) is reserved except 0x7f, the variable-length CDB whose
    ADDITIONAL CDB LENGTH is byte 7.  Groups 6 and 7 are vendor specific; the kernel
    treats them as 10-byte CDBs (COMMAND_SIZE table).
    """
    if opcode == 0x7F:
        return cdb7 + 8
    return (6, 10, 10, 12, 16, 12, 10, 10)[(opcode >> 5) & 7]
