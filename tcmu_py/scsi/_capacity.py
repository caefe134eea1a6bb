"""READ CAPACITY (10) and (16): the size, block length and provisioning of the medium
(SBC-3 READ CAPACITY (10) and (16) commands)."""

from __future__ import annotations

from collections.abc import Sequence

from ._common import Op, data_in, sa_key
from ._model import DeviceState, Outcome


def read_capacity_10(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    """SBC-3 READ CAPACITY (10).  The LBA and PMI fields are obsolete and ignored.  A medium whose last
    LBA does not fit in 32 bits reports FFFF_FFFFh: "use READ CAPACITY (16)"."""
    last = dev.num_lbas - 1
    returned = last if 0 <= last < 0xFFFFFFFF else (0 if last < 0 else 0xFFFFFFFF)
    data = returned.to_bytes(4, "big") + (dev.block_size & 0xFFFFFFFF).to_bytes(4, "big")
    return data_in(data, 8)


def read_capacity_16(
    cdb: bytes, iov: Sequence[memoryview], data_len: int, dev: DeviceState
) -> Outcome:
    """SBC-3 READ CAPACITY (16): 32 bytes; LBPME when the handler can unmap, LBPRZ when unmapped
    blocks then read as zeroes, and the physical block exponent."""
    alloc = int.from_bytes(cdb[10:14], "big")
    buf = bytearray(32)
    buf[0:8] = max(dev.num_lbas - 1, 0).to_bytes(8, "big")
    buf[8:12] = (dev.block_size & 0xFFFFFFFF).to_bytes(4, "big")
    buf[13] = dev.lbppbe & 0x0F  # LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
    if dev.caps.unmap:
        buf[14] = 0x80 | (0x40 if dev.caps.lbprz else 0)  # LBPME, LBPRZ
    return data_in(buf, alloc)


OPS: dict[int, Op] = {
    0x25: Op(read_capacity_10, "READ CAPACITY (10)", 10, bytes((0x25,)) + bytes(9)),
    sa_key(0x9E, 0x10): Op(
        read_capacity_16,
        "READ CAPACITY (16)",
        16,
        bytes((0x9E, 0x1F)) + bytes(8) + b"\xff" * 4 + bytes(2),
    ),
}
