"""A vhost-user frontend that presents a broker space to a real backend (blk or net device).

For backend authors and VMMs: `Frontend` speaks the vhost-user protocol on a backend's socket
(QEMU docs/interop/vhost-user.rst); `SplitQueue` is a split virtqueue laid out in guest memory;
`Bridge` attaches to a broker space as an fd+offset client, turns the ranges it is granted
into backend memory regions, and on a revocation removes the regions and checks the backend's
own /proc/PID/maps before it acknowledges (the backend's reply alone is not proof). It
acknowledges only what is true: pieces it could not export again are reported as withdrawn
with the acknowledgement, a backend that still maps a revoked offset, or that dropped the
connection, gets the revocation refused, never acked.

Device classes: `BlkBridge` (virtio-blk: one request queue; tested with qemu-storage-daemon)
and `membroker.vhost_net.NetBridge` (virtio-net: receive and transmit rings; tested with DPDK
testpmd). Each offers its own feature bits (`DeviceType`) and refuses, at negotiation and
before any feature is set, a backend whose offer shows a device of the other class.

With `iommu=True` the bridge negotiates VIRTIO_F_ACCESS_PLATFORM and the IOTLB
(BACKEND_REQ + REPLY_ACK): the device sees I/O virtual addresses (the guest-physical
addresses of the space's layout), its IOTLB misses on the backend channel are answered from
what is exported now (a miss anywhere else gets no UPDATE), and a revocation starts with an
IOTLB INVALIDATE of the revoked IOVAs that the backend acknowledges before anything else
happens (and before the broker is acknowledged).

Wire layouts (little endian): header ``u32 request; u32 flags (version 1, 0x4 reply, 0x8
need reply); u32 size``; region ``u64 guest_phys_addr, memory_size, userspace_addr,
mmap_offset``; ADD/REM_MEM_REG ``u64 padding; region``; vring state ``u32 index, num``;
vring addr ``u32 index, flags; u64 desc, used, avail, log``; IOTLB ``u64 iova, size, uaddr;
u8 perm, type`` (padded to 32 bytes; on the backend channel too).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from membroker._sys import memfd as sys_memfd
from membroker._sys import mman
from membroker._sys import sock as sys_sock
from membroker._sys.libc import MAP_FAILED, PAGE_SIZE, KernelFeatureMissing, check, libc
from membroker._sys.proc import ProcessView, Vma
from membroker.errors import MembrokerError
from membroker.session import Session
from membroker.types import Access, AccessRange

if TYPE_CHECKING:
    from membroker.clients import FdClient, Pin

log = logging.getLogger("membroker")

GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
MAX_TABLE_REGIONS = 8
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES = 15, 16
SET_VRING_ENABLE = 18
SET_BACKEND_REQ_FD, IOTLB_MSG = 21, 22
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38
# Backend -> frontend requests (on the backend channel).
BACKEND_IOTLB_MSG = 1

F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_BLK_F_GEOMETRY = 1 << 4
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
PROTOCOL_F_RARP = 1 << 2
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_MTU = 1 << 4
PROTOCOL_F_BACKEND_REQ = 1 << 5
PROTOCOL_F_CONFIG = 1 << 9
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 1 << 15

# Feature bits only a virtio-net device defines (control queue and friends: CTRL_RX, VLAN,
# GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR; MRG_RXBUF), and protocol features only vhost-user-net
# uses (RARP, MTU): a backend offering one is a net device. A virtio-blk device defines
# GEOMETRY (no net meaning); the CONFIG protocol feature is what a blk backend offers for its
# configuration space.
NET_ONLY_FEATURES = VIRTIO_NET_F_MRG_RXBUF | sum(1 << b for b in (18, 19, 21, 22, 23))
NET_ONLY_PROTOCOL = PROTOCOL_F_RARP | PROTOCOL_F_MTU
BLK_ONLY_FEATURES = VIRTIO_BLK_F_GEOMETRY
BLK_ONLY_PROTOCOL = PROTOCOL_F_CONFIG

# IOTLB message: u64 iova, size, uaddr; u8 perm, type (padded to 32 bytes).
_IOTLB = struct.Struct("<QQQBB6x")
IOTLB_MISS, IOTLB_UPDATE, IOTLB_INVALIDATE, IOTLB_ACCESS_FAIL = 1, 2, 3, 4
IOTLB_RO, IOTLB_WO, IOTLB_RW = 1, 2, 3

_HEADER = struct.Struct("<III")
_REGION = struct.Struct("<QQQQ")
_VERSION, _REPLY, _NEED_REPLY = 0x1, 0x4, 0x8

VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH = 0, 1, 4
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR = 0, 1
SECTOR = 512
_DESC_NEXT, _DESC_WRITE = 1, 2

# The bridge's own parking page: a private memfd region at a guest-physical address far above
# any space's, where a stopped vring is pointed while guest memory regions come and go (a
# libvhost-user backend re-translates every vring it knows after each memory change and drops
# the connection when one does not translate).
PARK_GPA = 1 << 52
_POLLRDHUP = 0x2000
_HANGUP = select.POLLHUP | select.POLLERR | _POLLRDHUP

Span = tuple[int, int]


class VhostUserError(MembrokerError):
    """The backend broke the protocol, refused a request, or went away."""


@dataclasses.dataclass(frozen=True, slots=True)
class MemRegion:
    """A region as the backend is told: guest-physical, size, frontend address, fd offset."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return _REGION.pack(self.gpa, self.size, self.uaddr, self.mmap_offset)


class Frontend:
    """The frontend side of one vhost-user connection (blocking, one request at a time)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
            self.backend_pid = sys_sock.peer_credentials(self.sock).pid
        except OSError as exc:
            self.sock.close()
            raise VhostUserError(f"cannot connect to the backend at {path}: {exc}") from exc
        self.reply_ack = False
        self._lock = threading.Lock()

    def _send(
        self, request: int, payload: bytes = b"", fds: Sequence[int] = (), need_reply: bool = False
    ) -> None:
        flags = _VERSION | (_NEED_REPLY if need_reply else 0)
        data = memoryview(_HEADER.pack(request, flags, len(payload)) + payload)
        try:
            while data:
                sent = sys_sock.send_with_fds(self.sock, data, fds)
                data, fds = data[sent:], ()
        except OSError as exc:
            raise VhostUserError(f"backend went away sending request {request}: {exc}") from exc

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except OSError as exc:
                raise VhostUserError(f"backend went away: {exc}") from exc
            if not chunk:
                raise VhostUserError("backend closed the connection")
            buf += chunk
        return buf

    def _reply(self, request: int) -> bytes:
        req, flags, size = _HEADER.unpack(self._recv_exact(_HEADER.size))
        if req != request or not flags & _REPLY:
            raise VhostUserError(f"expected a reply to {request}, got {req} (flags {flags:#x})")
        return self._recv_exact(size)

    def get_u64(self, request: int) -> int:
        with self._lock:
            self._send(request)
            (value,) = struct.unpack("<Q", self._reply(request))
            return int(value)

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Sends a request; with REPLY_ACK negotiated, waits for and checks its status."""
        with self._lock:
            self._send(request, payload, fds, need_reply=self.reply_ack)
            if self.reply_ack:
                (status,) = struct.unpack("<Q", self._reply(request))
                if status != 0:
                    raise VhostUserError(f"backend refused request {request}: status {status}")

    def negotiate(
        self,
        features: int,
        protocol_features: int,
        check: Callable[[int, int], None] | None = None,
    ) -> tuple[int, int]:
        """Feature negotiation and SET_OWNER; returns (features, protocol features) agreed.
        `check(offered features, offered protocol features)` may refuse the backend (raise)
        before anything is set."""
        offered = self.get_u64(GET_FEATURES)
        offered_proto = 0
        if offered & F_PROTOCOL_FEATURES:
            offered_proto = self.get_u64(GET_PROTOCOL_FEATURES)
        if check is not None:
            check(offered, offered_proto)
        agreed_proto = 0
        if offered & F_PROTOCOL_FEATURES:
            agreed_proto = offered_proto & protocol_features
            self.request(SET_PROTOCOL_FEATURES, struct.pack("<Q", agreed_proto))
            self.reply_ack = bool(agreed_proto & PROTOCOL_F_REPLY_ACK)
        self.request(SET_OWNER)
        agreed = offered & (features | F_PROTOCOL_FEATURES)
        self.request(SET_FEATURES, struct.pack("<Q", agreed))
        return agreed, agreed_proto

    def iotlb(self, kind: int, iova: int, size: int, uaddr: int = 0, perm: int = 0) -> None:
        """One IOTLB_MSG (UPDATE or INVALIDATE); with REPLY_ACK, returns once the backend
        says it is applied."""
        self.request(IOTLB_MSG, _IOTLB.pack(iova, size, uaddr, perm, kind))

    def set_backend_req_fd(self, fd: int) -> None:
        """Hands the backend its end of the backend channel (IOTLB misses arrive there)."""
        self.request(SET_BACKEND_REQ_FD, b"", [fd])

    def add_region(self, region: MemRegion, fd: int) -> None:
        self.request(ADD_MEM_REG, struct.pack("<Q", 0) + region.pack(), [fd])

    def remove_region(self, region: MemRegion) -> None:
        self.request(REM_MEM_REG, struct.pack("<Q", 0) + region.pack())

    def set_mem_table(self, regions: Sequence[MemRegion], fd: int | Sequence[int]) -> None:
        """The whole table at once (backends without CONFIGURE_MEM_SLOTS): every region is
        sent with its own copy of the fd (or with its own fd, one per region)."""
        if len(regions) > MAX_TABLE_REGIONS:
            raise VhostUserError(
                f"{len(regions)} regions: SET_MEM_TABLE carries at most {MAX_TABLE_REGIONS}"
            )
        fds = [fd] * len(regions) if isinstance(fd, int) else list(fd)
        payload = struct.pack("<II", len(regions), 0) + b"".join(r.pack() for r in regions)
        self.request(SET_MEM_TABLE, payload, fds)

    def get_vring_base(self, index: int) -> int:
        """Stops the vring; returns where the backend will resume it (its last avail index)."""
        with self._lock:
            self._send(GET_VRING_BASE, struct.pack("<II", index, 0))
            _, num = struct.unpack("<II", self._reply(GET_VRING_BASE))
            return int(num)

    def set_vring_addr(self, index: int, desc: int, avail: int, used: int) -> None:
        self.request(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, desc, used, avail, 0))

    def setup_vring(
        self,
        index: int,
        num: int,
        desc: int,
        avail: int,
        used: int,
        kick_fd: int,
        call_fd: int,
        base: int = 0,
    ) -> None:
        """Ring addresses are frontend addresses (translated through the regions)."""
        self.request(SET_VRING_NUM, struct.pack("<II", index, num))
        self.set_vring_addr(index, desc, avail, used)
        self.request(SET_VRING_BASE, struct.pack("<II", index, base))
        self.request(SET_VRING_CALL, struct.pack("<Q", index), [call_fd])
        self.request(SET_VRING_KICK, struct.pack("<Q", index), [kick_fd])
        self.request(SET_VRING_ENABLE, struct.pack("<II", index, 1))

    def hung_up(self) -> bool:
        """Whether the backend has closed its end (nothing is read)."""
        p = select.poll()
        p.register(self.sock, _HANGUP)
        return bool(p.poll(0))

    def close(self) -> None:
        self.sock.close()


class SplitQueue:
    """A split virtqueue in guest memory, driven from the frontend's mapping of it.

    Layout at `offset` of `mem` (guest-physical `gpa`): descriptor table (16 * num), avail ring
    (4 + 2 * num, padded to 4), used ring (4 + 8 * num).
    """

    def __init__(self, mem: mman.Mapping, offset: int, gpa: int, num: int) -> None:
        self.mem, self.offset, self.gpa, self.num = mem, offset, gpa, num
        self.desc_off = offset
        self.avail_off = offset + 16 * num
        self.used_off = (self.avail_off + 4 + 2 * num + 3) & ~3
        self.end_off = self.used_off + 4 + 8 * num
        self.mem.write(offset, bytes(self.end_off - offset))
        self.avail_idx = 0
        self.last_used = 0

    def addresses(self) -> tuple[int, int, int]:
        """(desc, avail, used) frontend addresses."""
        base = self.mem.address
        return base + self.desc_off, base + self.avail_off, base + self.used_off

    def iovas(self) -> tuple[int, int, int]:
        """(desc, avail, used) as I/O virtual addresses (their guest-physical addresses)."""
        gpa = self.gpa - self.offset
        return gpa + self.desc_off, gpa + self.avail_off, gpa + self.used_off

    def write_desc(self, index: int, gpa: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(self.desc_off + 16 * index, struct.pack("<QIHH", gpa, length, flags, nxt))

    def publish(self, head: int) -> None:
        """Makes the chain at `head` available (the entry before the index that publishes it)."""
        slot = self.avail_idx % self.num
        self.mem.write(self.avail_off + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail_off + 2, struct.pack("<H", self.avail_idx))

    def avail_entry(self, idx: int) -> int:
        (head,) = struct.unpack("<H", self.mem.read(self.avail_off + 4 + 2 * (idx % self.num), 2))
        return int(head)

    def rewrite_avail(self, start: int, heads: Sequence[int]) -> None:
        """On a stopped ring only: the entries from index `start` on become `heads`, and the
        avail index moves to just after them."""
        for i, head in enumerate(heads):
            slot = (start + i) % self.num
            self.mem.write(self.avail_off + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (start + len(heads)) & 0xFFFF
        self.mem.write(self.avail_off + 2, struct.pack("<H", self.avail_idx))

    def used_elem(self, idx: int) -> tuple[int, int]:
        """(descriptor id, bytes written) of used ring entry `idx`."""
        slot = idx % self.num
        head, length = struct.unpack("<II", self.mem.read(self.used_off + 4 + 8 * slot, 8))
        return int(head), int(length)

    def submit(self, chain: Sequence[tuple[int, int, bool]]) -> int:
        """Writes a descriptor chain of (gpa, len, device_writes) at slot 0.. and publishes it."""
        head = (self.avail_idx * len(chain)) % self.num
        for i, (gpa, length, writable) in enumerate(chain):
            flags = (_DESC_NEXT if i + 1 < len(chain) else 0) | (_DESC_WRITE if writable else 0)
            nxt = (head + i + 1) % self.num
            self.mem.write(
                self.desc_off + 16 * ((head + i) % self.num),
                struct.pack("<QIHH", gpa, length, flags, nxt),
            )
        slot = self.avail_idx % self.num
        self.mem.write(self.avail_off + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        # The ring entry is written before the index that publishes it.
        self.mem.write(self.avail_off + 2, struct.pack("<H", self.avail_idx))
        return head

    def used_idx(self) -> int:
        (idx,) = struct.unpack("<H", self.mem.read(self.used_off + 2, 2))
        return int(idx)


@dataclasses.dataclass(slots=True)
class _Export:
    """One region of guest memory the backend maps: space bytes [lo, hi) at gpa."""

    lo: int
    hi: int
    region: MemRegion
    # The file bytes the backend's mapping of it covers: [lo, hi), or [0, hi) for a backend
    # that maps regions from file offset 0. Pinned while exported (for writing where held
    # read-write, for reading where read-only).
    span: Span
    # The parts of `span` held read-only (exported with an IOTLB only): mapped read-only
    # here, and given to the device's IOTLB as read-only entries.
    ro: list[Span] = dataclasses.field(default_factory=list)
    pins: list[Pin] = dataclasses.field(default_factory=list)

    def run_at(self, offset: int) -> tuple[Span, bool]:
        """The run of one access level of [lo, hi) holding `offset`, and whether it is
        read-only."""
        ro = _intersect([(self.lo, self.hi)], self.ro)
        for run in ro:
            if run[0] <= offset < run[1]:
                return run, True
        for run in _subtract([(self.lo, self.hi)], ro):
            if run[0] <= offset < run[1]:
                return run, False
        raise ValueError(f"offset {offset:#x} is not in {self.lo:#x}-{self.hi:#x}")


def _merge(spans: Sequence[Span]) -> list[Span]:
    out: list[Span] = []
    for lo, hi in sorted(s for s in spans if s[0] < s[1]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _subtract(spans: Sequence[Span], cuts: Sequence[Span]) -> list[Span]:
    """The parts of `spans` outside every span of `cuts`."""
    pieces = list(spans)
    for c_lo, c_hi in cuts:
        pieces = [
            p
            for lo, hi in pieces
            for p in ((lo, min(hi, c_lo)), (max(lo, c_hi), hi))
            if p[0] < p[1]
        ]
    return pieces


def _overlaps(span: Span, spans: Sequence[Span]) -> bool:
    return any(span[0] < hi and lo < span[1] for lo, hi in spans)


def _covered(span: Span, spans: Sequence[Span]) -> bool:
    """Whether every byte of `span` lies in `spans` (merged)."""
    return not _subtract([span], spans)


def _intersect(spans: Sequence[Span], others: Sequence[Span]) -> list[Span]:
    """The parts of `spans` inside some span of `others`."""
    return [
        (max(lo, o_lo), min(hi, o_hi))
        for lo, hi in spans
        for o_lo, o_hi in others
        if max(lo, o_lo) < min(hi, o_hi)
    ]


def _minus(r: AccessRange, cuts: list[AccessRange]) -> list[AccessRange]:
    """The parts of `r` outside every range of `cuts`."""
    return [
        AccessRange(lo, hi - lo, r.access)
        for lo, hi in _subtract([(r.offset, r.end)], [(c.offset, c.end) for c in cuts])
    ]


def _fmt(spans: Sequence[Span]) -> str:
    return ", ".join(f"{lo:#x}+{hi - lo:#x}" for lo, hi in spans)


class _Window:
    """An address-space reservation as large as the space, where each exported range is
    mapped at base + its offset (and nothing else is): a range exported again lands at the
    same frontend address, so vring addresses stay valid across memory changes."""

    def __init__(self, size: int) -> None:
        # SAFETY: addr NULL, the kernel picks a free range; anonymous PROT_NONE, no commit.
        address = libc.mmap(
            None,
            size,
            mman.PROT_NONE,
            mman.MAP_PRIVATE | mman.MAP_ANONYMOUS | mman.MAP_NORESERVE,
            -1,
            0,
        )
        if address is None or address == MAP_FAILED:
            check(-1, "mmap(reservation)")
        self.mem = mman.Mapping(int(address), size)

    @property
    def address(self) -> int:
        return self.mem.address

    def map(self, fd: int, lo: int, hi: int, prot: int) -> None:
        # SAFETY: MAP_FIXED over [lo, hi) of our own reservation, atomically.
        ret = libc.mmap(self.address + lo, hi - lo, prot, mman.MAP_SHARED | mman.MAP_FIXED, fd, lo)
        if ret is None or ret == MAP_FAILED:
            check(-1, "mmap(MAP_FIXED export)")

    def unmap(self, lo: int, hi: int) -> None:
        """Back to reserved: the file is no longer mapped there in this process."""
        # SAFETY: MAP_FIXED over [lo, hi) of our own reservation, atomically.
        ret = libc.mmap(
            self.address + lo,
            hi - lo,
            mman.PROT_NONE,
            mman.MAP_PRIVATE | mman.MAP_ANONYMOUS | mman.MAP_FIXED | mman.MAP_NORESERVE,
            -1,
            0,
        )
        if ret is None or ret == MAP_FAILED:
            check(-1, "mmap(MAP_FIXED reservation)")

    def close(self) -> None:
        self.mem.close()


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceType:
    """A virtio device class the bridge can drive: its name, the feature bits it offers the
    backend, and what a backend of another class would reveal itself by."""

    name: str
    features: int
    # Offered feature / protocol bits that only a device of another class defines, per class.
    foreign: tuple[tuple[str, int, int], ...]


VIRTIO_BLK = DeviceType(
    "virtio-blk",
    VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH,
    (("virtio-net", NET_ONLY_FEATURES, NET_ONLY_PROTOCOL),),
)
VIRTIO_NET = DeviceType(
    "virtio-net",
    VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF,
    (("virtio-blk", BLK_ONLY_FEATURES, BLK_ONLY_PROTOCOL),),
)


def check_device(device: DeviceType, path: str, features: int, protocol: int) -> None:
    """Refuses a backend whose offer shows it is a device of another class (its bits would
    mean something else there: virtio-blk's BLK_SIZE and FLUSH are a net device's GSO and
    GUEST_ECN). A backend whose offer shows no class is accepted."""
    for other, feature_bits, protocol_bits in device.foreign:
        f, p = features & feature_bits, protocol & protocol_bits
        if f or p:
            raise VhostUserError(
                f"the backend at {path} is a {other} device (it offers feature bits "
                f"{f:#x} and protocol features {p:#x} that only {other} defines); this "
                f"bridge drives {device.name}: refused before any feature was set"
            )


class Bridge:
    """A broker space presented to a vhost-user backend, range by range (the device-neutral
    part: memory regions, revocations, pins, liveness, IOTLB). Device classes (`BlkBridge`,
    `membroker.vhost_net.NetBridge`) add their queues and requests.

    The bridge is the broker's fd+offset client `name`. What it is granted (and shared)
    becomes backend memory regions at gpa = region gpa of the space's layout (identity when
    the space has no layout).

    What it acknowledges is true:
    - At connect it checks the device class the backend offers (a backend of another class
      is refused) and asks the kernel how the backend maps a region (with a private page,
      never guest memory): a backend that maps regions from file offset 0 (libvhost-user
      before QEMU 9, so qemu-storage-daemon 7.2; DPDK 22.11) is only given a region [lo, hi)
      when all of [0, hi) is held. A revocation that leaves a piece it cannot give back safely
      reports the piece as withdrawn with its acknowledgement (the owner's report lists it).
    - Regions are removed before any piece is added again, and a piece is never one that
      would map a revoked byte: the hole is in no mapped region at any moment.
    - A revocation that touches the region holding a vring stops the ring first (parked on
      the bridge's own page), and starts it again where it was if its memory stays exported;
      if its memory is revoked the ring stays stopped and the connection lives. A device
      class may stop a ring for buffers in flight into the revoked memory too and take them
      off the ring before it starts again (`revocations` says what was in flight).
    - With `iommu=True` (VIRTIO_F_ACCESS_PLATFORM, IOTLB over BACKEND_REQ + REPLY_ACK) the
      device sees I/O virtual addresses (= the guest-physical addresses of the grants): its
      IOTLB misses are answered from what is exported now, a revocation is first an
      INVALIDATE the backend acknowledges, and only then are regions changed.
    - IOTLB permissions follow the grant: a read-only range is exported only with an IOTLB
      (a backend maps every region read-write: without one it could write it), and its
      entries are read-only (VHOST_ACCESS_RO); a miss asking to write it is refused. A
      downgrade (rw -> ro) invalidates the range first, then exports it again read-only, so
      the device can go on reading it and can no longer write it; without an IOTLB it is
      withdrawn. A range raised ro -> rw is taken back and exported again read-write at the
      next `refresh()` (its read-only entries invalidated first).
    - Buffers a device class had offered the device in revoked memory (taken off a ring, or
      taken by the device and not returned when the ring stopped) go with the
      acknowledgement (`Session.report_in_flight`): the owner's report lists them.
    - A backend that keeps fds of the space (DPDK keeps one per region while a table is
      loaded; seen in its /proc/PID/fd) could map any offset of it: its isolation is logical
      only, and the bridge says so to the broker (`Session.declare_isolation`) whenever that
      changes, so the listing and the reports show it.
    - The backend still mapping a revoked offset, or dropping the connection during the
      teardown, refuses the revocation (never an ack). The acknowledgement reads the
      backend's whole maps (every mapping of the space's file, wherever it is); that is the
      one full read a revocation costs.
    - Every exported region is pinned (the file bytes the backend maps): the broker asks the
      bridge to release before it revokes, waits for a request in flight, and applies its
      on_pinned policy to a backend that cannot let go. Releasing asks the kernel only where
      the last full read showed the space (PROCMAP_QUERY, while no region message has gone
      since): a mapping the backend made elsewhere on its own after that read is left to the
      acknowledgement, which refuses (the broker fences; on_pinned does not apply).
    - A backend hang-up is seen at once (a thread polls the socket): everything is released,
      `gone` set and `on_backend_gone(reason)` called.
    """

    DEVICE: DeviceType = VIRTIO_BLK
    NUM_QUEUES = 1
    QUEUE_SIZE = 16
    # Whether the device class may run with an IOTLB (iommu=True).
    IOTLB = True
    client: FdClient | None

    def __init__(
        self,
        session: Session,
        space_id: str,
        backend_socket: str,
        *,
        use_mem_slots: bool = True,
        iommu: bool = False,
        on_backend_gone: Callable[[str], None] | None = None,
    ) -> None:
        """use_mem_slots=False sends whole tables (SET_MEM_TABLE) even to a backend that
        offers CONFIGURE_MEM_SLOTS (ADD/REM_MEM_REG). iommu=True negotiates
        VIRTIO_F_ACCESS_PLATFORM and the IOTLB (refused when the backend does not offer it)."""
        self._connect(backend_socket, use_mem_slots, iommu)
        self.on_backend_gone = on_backend_gone
        self._session: Session | None = session
        try:
            client = session.attach_fd(
                space_id, on_revoke=self._on_revoke, on_unpin_request=self._on_release
            )
            client.on_rebound = self._rebound
            self.client = client
            self.space_id = space_id
            info = client.info
            self._gpa = info.gpa_of if info.regions else (lambda offset: offset)
            self._open_space(client.fd, info.size)
            unsafe = self._export_held()
            if unsafe:
                raise VhostUserError(self._unsafe_message(unsafe[0]))
            self._start_watch()
        except BaseException:
            self.close()  # nothing stays attached, mapped or open
            raise

    @classmethod
    def without_broker(
        cls: type[_B], fd: int, size: int, backend_socket: str, *, iommu: bool = False
    ) -> _B:
        """The same driver over a plain memfd (borrowed) exported whole, gpa = offset: what
        a VMM does without a broker, the benchmark's baseline."""
        self = cls.__new__(cls)
        self._connect(backend_socket, True, iommu)
        self.on_backend_gone = None
        self._session = None
        self.space_id = ""
        try:
            self._gpa = lambda offset: offset
            self._open_space(fd, size)
            self._export_held()
            self._start_watch()
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self, backend_socket: str, use_mem_slots: bool, iommu: bool) -> None:
        self.client = None
        self._window: _Window | None = None
        self._size = 0
        self._lock = threading.RLock()
        self._exports: dict[int, _Export] = {}
        self._queues: dict[int, SplitQueue] = {}
        self._queue_why: dict[int, str] = {}
        self.gone: str | None = None
        self.gone_at: float | None = None
        self._gone_done = threading.Event()
        self._watcher: threading.Thread | None = None
        self._closing = False
        # Teardowns that failed on a release of pins: (what, why), refused when revoked.
        self._failed: list[tuple[list[Span], str]] = []
        # Exports taken out of the table whose teardown did not complete (pins still held).
        self._stranded: list[_Export] = []
        self._park_fd = -1
        self._park: mman.Mapping | None = None
        # Bumped before every message that changes what the backend maps (regions, tables);
        # the last full read of its maps, with the count it was made at: while no message has
        # gone since, it is every mapping of the space the protocol gave the backend.
        self._table_gen = 0
        self._seen: tuple[int, list[Vma]] | None = None
        # Full reads of the backend's maps made by this bridge (a benchmark's accounting).
        self.full_reads = 0
        self.iommu = iommu
        # IOTLB traffic, newest last: (monotonic time, what, iova, size, outcome).
        self.iotlb_log: collections.deque[tuple[float, str, int, int, str]] = collections.deque(
            maxlen=4096
        )
        # What each revocation found in flight on the rings: newest last.
        self.revocations: collections.deque[InFlight] = collections.deque(maxlen=256)
        self._backend_ch: socket.socket | None = None
        self._iotlb_thread: threading.Thread | None = None
        # A revocation's new access while its push is handled (the client records it only
        # after its handler returned): what is held now, as far as exports go.
        self._lowering: list[AccessRange] = []
        # Whether the backend keeps fds of its regions' files (found at the probe), and what
        # the broker was last told about the isolation of the space.
        self.backend_keeps_fds = False
        self.isolation = ""
        self._isolation_gen = -1
        # Whether the broker of the current connection was told (a resumed session meets a
        # daemon that was not).
        self._isolation_told = False
        if iommu and not self.IOTLB:
            raise VhostUserError(
                f"{self.DEVICE.name}: no IOTLB in this device class (a request waits for its "
                "completion under the lock IOTLB misses are served under); iommu=True is for "
                "virtio-net"
            )
        self.frontend = Frontend(backend_socket)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.backend = ProcessView(self.frontend.backend_pid)
            features = self.DEVICE.features | (VIRTIO_F_ACCESS_PLATFORM if iommu else 0)
            protocol = PROTOCOL_F_REPLY_ACK | (
                PROTOCOL_F_CONFIGURE_MEM_SLOTS if use_mem_slots else 0
            )
            if iommu:
                protocol |= PROTOCOL_F_BACKEND_REQ

            def check(offered: int, offered_proto: int) -> None:
                check_device(self.DEVICE, backend_socket, offered, offered_proto)
                if iommu:
                    need = {
                        "VIRTIO_F_ACCESS_PLATFORM": offered & VIRTIO_F_ACCESS_PLATFORM,
                        "PROTOCOL_FEATURES": offered & F_PROTOCOL_FEATURES,
                        "BACKEND_REQ": offered_proto & PROTOCOL_F_BACKEND_REQ,
                        "REPLY_ACK": offered_proto & PROTOCOL_F_REPLY_ACK,
                    }
                    missing = [name for name, have in need.items() if not have]
                    if missing:
                        raise VhostUserError(
                            f"the backend at {backend_socket} offers no IOTLB (missing "
                            f"{', '.join(missing)}); a bridge with iommu=True needs it"
                        )

            self.features, self.protocol_features = self.frontend.negotiate(
                features, protocol, check
            )
            self.mem_slots = bool(self.protocol_features & PROTOCOL_F_CONFIGURE_MEM_SLOTS)
            if iommu:
                self._open_backend_channel()
            self.prefix_mapping = self._probe()
        except BaseException:
            self._close_backend_channel()
            if hasattr(self, "backend"):
                self.backend.close()
            self._close_park()
            self.frontend.close()
            for fd in (self.kick, self.call, self._wake):
                os.close(fd)
            raise

    def _probe(self) -> bool:
        """Exports the bridge's parking page (a private memfd, its second page at file offset
        PAGE_SIZE) and asks the kernel what the backend mapped: from file offset 0 means the
        backend maps every region from offset 0 (old libvhost-user). The page stays exported:
        stopped vrings are parked on it."""
        self._park_fd = sys_memfd.create_memfd("membroker-vhost-park", 2 * PAGE_SIZE)
        self._park = mman.Mapping.map_shared(
            self._park_fd, PAGE_SIZE, mman.PROT_READ | mman.PROT_WRITE, PAGE_SIZE
        )
        self._park_region = MemRegion(PARK_GPA, PAGE_SIZE, self._park.address, PAGE_SIZE)
        self._table_gen += 1
        if self.mem_slots:
            self.frontend.add_region(self._park_region, self._park_fd)
        else:
            self.frontend.set_mem_table([self._park_region], self._park_fd)
        st = os.fstat(self._park_fd)
        vmas = self.backend.mappings_of(st.st_dev, st.st_ino)
        # Whether it keeps the fd it was sent (the file stays reachable beyond the region).
        self.backend_keeps_fds = bool(self.backend.fds_of(st.st_dev, st.st_ino))
        # A backend that shows no mapping at all is assumed the worst.
        return not vmas or any(v.offset < PAGE_SIZE for v in vmas)

    def _close_park(self) -> None:
        if self._park is not None:
            self._park.close()
            self._park = None
        if self._park_fd >= 0:
            os.close(self._park_fd)
            self._park_fd = -1

    def _open_space(self, fd: int, size: int) -> None:
        self._own_fd = fd
        self._size = size
        st = os.fstat(fd)
        self._dev_ino = (st.st_dev, st.st_ino)
        self._window = _Window(size)

    @property
    def _fd(self) -> int:
        """The space's fd: the attachment's (a read-write one replaces the read-only one at
        the first rw grant), or the one given without a broker."""
        return self.client.fd if self.client is not None else self._own_fd

    # -- what may be exported ----------------------------------------------------------------

    def _span(self, lo: int, hi: int) -> Span:
        """The file bytes the backend maps for a region of [lo, hi)."""
        return (0 if self.prefix_mapping else lo, hi)

    def _access(self) -> tuple[list[Span], list[Span]]:
        """What the bridge holds now: (read-write, read-only) spans, merged; a revocation
        being handled counts at its new access."""
        if self.client is None:
            return [(0, self._size)], []
        ranges = self.client.ranges()
        rw = [(r.offset, r.end) for r in ranges if r.access is Access.RW]
        ro = [(r.offset, r.end) for r in ranges if r.access is Access.RO]
        if self._lowering:
            changed = [(r.offset, r.end) for r in self._lowering]
            rw, ro = _subtract(rw, changed), _subtract(ro, changed)
            ro += [(r.offset, r.end) for r in self._lowering if r.access is Access.RO]
        return _merge(rw), _merge(ro)

    def _exports_read_only(self) -> bool:
        """Whether read-only ranges may be exported: only with an IOTLB, whose entries then
        say read-only (a backend maps every region read-write), and only from a read-write
        fd (a backend's read-write mmap of a read-only description fails)."""
        return self.iommu and (self.client is None or bool(self.client.writable_fd))

    def _held(self, cut: Sequence[Span] = ()) -> list[Span]:
        """What the bridge holds now and may export, less `cut` (what a revocation in
        progress takes): what it holds read-write, and with an IOTLB what it holds read-only
        too."""
        rw, ro = self._access()
        held = rw + ro if self._exports_read_only() else rw
        return _merge(_subtract(_merge(held), cut))

    def _read_only(self) -> list[Span]:
        """What is held read-only now (exported read-only, with an IOTLB)."""
        return self._access()[1] if self._exports_read_only() else []

    def _unsafe_message(self, piece: Span) -> str:
        lo, hi = piece
        outside = _subtract([self._span(lo, hi)], self._held())
        return (
            f"the backend (pid {self.frontend.backend_pid}) maps offsets "
            f"{_fmt(outside)} of the space for a region of {lo:#x}+{hi - lo:#x}: more than "
            "this bridge holds (old libvhost-user maps regions from file offset 0); "
            "region not exported"
        )

    def _export_held(self) -> list[Span]:
        """Exports what is held and safe to export but not exported yet; returns the pieces
        that are held but would expose more than is held (not exported)."""
        with self._lock:
            gone = self._reexport_raised_locked()
            new, unsafe = self._export_locked()
        for exp in gone:
            _unpin(exp)
        self._pin(new)
        self._declare_isolation()
        return unsafe

    def _reexport_raised_locked(self) -> list[_Export]:
        """Parts exported read-only that are held read-write now (a grant raised them): the
        backend's read-only IOTLB entries and this bridge's read-only mapping of them would
        keep the device from writing where it now may. They are taken back like a release
        (INVALIDATE acknowledged, regions out, the kernel asked) and `_export_locked` adds
        them again read-write. Returns the exports removed (their pins go)."""
        if not self._exports_read_only():
            return []
        rw = self._access()[0]
        raised = _merge([p for e in self._exports.values() for p in _intersect(e.ro, rw)])
        if not raised:
            return []
        log.info("%s raised to read-write: exported again", _fmt(raised))
        return self._retract_locked(raised, report=False, full=False)

    def _export_locked(self) -> tuple[list[_Export], list[Span]]:
        """`_export_held` with the lock held, without pinning: (new exports, unsafe pieces)."""
        if self._window is None or self.gone is not None:
            return [], []
        held = self._held()
        have = [(e.lo, e.hi) for e in self._exports.values()]
        pieces = _subtract(held, have)
        safe = [p for p in pieces if _covered(self._span(*p), held)]
        unsafe = [p for p in pieces if p not in safe]
        return self._add(safe), unsafe

    def _new_export(self, lo: int, hi: int, ro: Sequence[Span]) -> _Export:
        """Maps [lo, hi) here (read-only where held read-only) and makes its export record
        (lock held); the backend is told by the caller."""
        assert self._window is not None
        span = self._span(lo, hi)
        region = MemRegion(self._gpa(lo), hi - lo, self._window.address + lo, lo)
        exp = _Export(lo, hi, region, span, _intersect([span], ro))
        self._window.map(self._fd, lo, hi, mman.PROT_READ | mman.PROT_WRITE)
        for a, b in _intersect([(lo, hi)], exp.ro):
            self._window.map(self._fd, a, b, mman.PROT_READ)
        self._exports[lo] = exp
        return exp

    def _add(self, pieces: Sequence[Span]) -> list[_Export]:
        """Maps the pieces here and in the backend (lock held); checks the kernel after."""
        if not pieces:
            return []
        ro = self._read_only()
        new = [self._new_export(lo, hi, ro) for lo, hi in pieces]
        if self.mem_slots:
            for exp in new:
                self._table_gen += 1
                self.frontend.add_region(exp.region, self._fd)
        else:
            self._publish_table()
        # The backend's reply is not proof of what it mapped: ask the kernel.
        over = self._overmapped()
        if over is not None:
            self._retract_locked([(e.lo, e.hi) for e in new], report=False)
            raise VhostUserError(
                f"the backend (pid {self.frontend.backend_pid}) maps offsets "
                f"{over[0]:#x}-{over[1]:#x} of the space, outside every region it was "
                "given; region(s) withdrawn"
            )
        return new

    def _pin(self, exports: Sequence[_Export]) -> None:
        """Pins what the backend maps for each export (without the lock: a pin is a call the
        session's reader answers, and the reader may be waiting for the lock)."""
        client = self.client
        if client is None:
            return
        for exp in exports:
            runs = [(p, False) for p in exp.ro] + [(p, True) for p in _subtract([exp.span], exp.ro)]
            pins: list[Pin] = []
            for (lo, hi), write in sorted(runs):
                try:
                    pins.append(client.pin(lo, hi - lo, write=write))
                except MembrokerError as exc:
                    # Being revoked right now: the revocation takes the region away next.
                    log.warning("cannot pin exported %#x+%#x: %s", lo, hi - lo, exc)
                    break
            else:
                with self._lock:
                    if self._exports.get(exp.lo) is exp and not exp.pins:
                        exp.pins = pins
                        continue
            for pin in pins:
                try:
                    pin.unpin()
                except MembrokerError:
                    pass

    def _publish_table(self) -> None:
        regions = [self._park_region, *(e.region for e in self._exports.values())]
        fds = [self._park_fd] + [self._fd] * (len(regions) - 1)
        self._table_gen += 1
        self.frontend.set_mem_table(regions, fds)

    def _space_vmas(self) -> list[Vma]:
        """Every mapping of the space's file in the backend, from one full read of its maps
        (lock held); remembered with the message count it was made at."""
        dev, ino = self._dev_ino
        self.full_reads += 1
        vmas = self.backend.mappings_of(dev, ino)
        self._seen = (self._table_gen, vmas)
        return vmas

    def _overmapped(self) -> tuple[int, int] | None:
        """A file range the backend maps outside every export's span, if any."""
        allowed = _merge([e.span for e in self._exports.values()])
        for vma in self._space_vmas():
            outside = _subtract([(vma.offset, vma.file_end)], allowed)
            if outside:
                return outside[0]
        return None

    # -- IOTLB (iommu=True) -------------------------------------------------------------------

    def _open_backend_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.frontend.set_backend_req_fd(theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._backend_ch = ours
        self._iotlb_thread = threading.Thread(
            target=self._serve_backend, name="vhost-user-iotlb", daemon=True
        )
        self._iotlb_thread.start()

    def _close_backend_channel(self) -> None:
        ch, self._backend_ch = self._backend_ch, None
        if ch is not None:
            try:
                ch.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if (
                self._iotlb_thread is not None
                and self._iotlb_thread is not threading.current_thread()
            ):
                self._iotlb_thread.join(5)
            ch.close()

    def _serve_backend(self) -> None:
        """The backend channel: IOTLB misses are answered from what is exported now (an
        UPDATE for the export holding the address); a miss anywhere else is refused (no
        UPDATE: the backend cannot translate it)."""
        ch = self._backend_ch
        assert ch is not None
        buf = b""
        while True:
            try:
                chunk = ch.recv(4096)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= _HEADER.size:
                req, flags, size = _HEADER.unpack_from(buf)
                if len(buf) < _HEADER.size + size:
                    break
                payload = buf[_HEADER.size : _HEADER.size + size]
                buf = buf[_HEADER.size + size :]
                status = 1
                if req == BACKEND_IOTLB_MSG and size >= _IOTLB.size - 6:
                    iova, _, _, perm, kind = _IOTLB.unpack(payload.ljust(_IOTLB.size, b"\0"))
                    if kind == IOTLB_MISS:
                        status = 0 if self._serve_miss(iova, perm) else 1
                    else:
                        self._iotlb_note("backend", iova, 0, f"type {kind} (ignored)")
                else:
                    log.warning("backend channel request %d ignored", req)
                if flags & _NEED_REPLY:
                    reply = _HEADER.pack(req, _VERSION | _REPLY, 8) + struct.pack("<Q", status)
                    try:
                        ch.sendall(reply)
                    except OSError:
                        return

    def _iotlb_note(self, what: str, iova: int, size: int, outcome: str) -> None:
        self.iotlb_log.append((time.monotonic(), what, iova, size, outcome))

    def _serve_miss(self, iova: int, perm: int) -> bool:
        # Under the bridge's lock: a miss is answered before a revocation starts or after it
        # has ended (from what is exported then), never with a translation it invalidates.
        with self._lock:
            entry = self._translate(iova)
            if entry is None or self.gone is not None:
                self._iotlb_note("miss", iova, 0, "refused: not exported")
                return False
            lo, size, uaddr, allowed = entry
            if perm & ~allowed:
                # A write asked of read-only memory: no entry that would allow it exists.
                self._iotlb_note("miss", iova, 0, f"refused: perm {perm} of read-only memory")
                return False
            try:
                self.frontend.iotlb(IOTLB_UPDATE, lo, size, uaddr, allowed)
            except VhostUserError as exc:
                self._iotlb_note("miss", iova, 0, f"failed: {exc}")
                return False
            as_ = "ro" if allowed == IOTLB_RO else "rw"
            self._iotlb_note("miss", iova, size, f"served {lo:#x}+{size:#x} perm {perm} as {as_}")
            return True

    def _translate(self, iova: int) -> tuple[int, int, int, int] | None:
        """(iova, size, frontend address, IOTLB permission) of the run of one access level
        of the export (or the parking page) holding iova: read-only where the grant is."""
        park = self._park_region
        if park.gpa <= iova < park.gpa + park.size:
            return park.gpa, park.size, park.uaddr, IOTLB_RW
        for exp in self._exports.values():
            r = exp.region
            if r.gpa <= iova < r.gpa + r.size:
                (lo, hi), read_only = exp.run_at(exp.lo + iova - r.gpa)
                at = lo - exp.lo
                return r.gpa + at, hi - lo, r.uaddr + at, IOTLB_RO if read_only else IOTLB_RW
        return None

    def _invalidate(self, cut: list[Span]) -> None:
        """INVALIDATEs the IOVAs of every exported byte in `cut`, each acknowledged by the
        backend before the next step (lock held)."""
        for exp in list(self._exports.values()):
            for lo, hi in _intersect([(exp.lo, exp.hi)], cut):
                iova = exp.region.gpa + lo - exp.lo
                t0 = time.monotonic()
                self.frontend.iotlb(IOTLB_INVALIDATE, iova, hi - lo)
                self._iotlb_note(
                    "invalidate", iova, hi - lo, f"acked in {(time.monotonic() - t0) * 1e6:.0f} us"
                )

    # -- revocations -------------------------------------------------------------------------

    def _on_release(self, ranges: list[tuple[int, int]]) -> None:
        """The broker asks for the pins in `ranges` before it revokes them (session thread):
        the regions whose mapping touches them leave the backend, the kernel confirms, then
        their pins go. While the backend still maps them the pins stay: the broker then fails
        the revocation or fences this client, per its on_pinned policy."""
        cut = _merge([(o, o + n) for o, n in ranges])
        try:
            removed = self._retract(cut, full=False)
        except VhostUserError as exc:
            log.error("cannot release %s to the broker: %s", _fmt(cut), exc)
            return
        self._declare_isolation()
        for exp in removed:
            _unpin(exp)

    def _on_revoke(self, ranges: list[AccessRange]) -> None:
        """On a revocation (session thread): the regions whose mapping touches the ranges
        leave the backend, the pieces that stay safe come back, and the backend's own maps are
        checked for every revoked offset. Raises (the revocation is refused, not acked) while
        the backend still maps one, or when it dropped the connection meanwhile."""
        cut = _merge([(r.offset, r.end) for r in ranges])
        with self._lock:
            failed = [why for spans, why in self._failed if any(_overlaps(s, cut) for s in spans)]
            self._failed = [f for f in self._failed if f[1] not in failed]
        if failed:
            raise VhostUserError(failed[0])
        # Ranges lowered, not taken (read-only now) are taken from the backend too (its
        # IOTLB entries and regions gave it write access); with an IOTLB they come back
        # read-only at once, otherwise they are withdrawn (a backend maps read-write).
        lowered = _merge([(r.offset, r.end) for r in ranges if r.access is not Access.NONE])
        back: list[_Export] = []
        with self._lock:
            self._lowering = list(ranges)
            try:
                self._retract_locked(cut)
                if lowered and self._exports_read_only():
                    back = self._export_locked()[0]
            finally:
                self._lowering = []
            exported = [(e.lo, e.hi) for e in self._exports.values()]
        if back:
            self._pin_later(back)
        self._declare_isolation()
        withdrawn = _subtract(lowered, exported)
        if withdrawn:
            self._report_withdrawn(_merge(withdrawn))

    def _retract(self, cut: list[Span], full: bool = True) -> list[_Export]:
        with self._lock:
            return self._retract_locked(cut, full=full)

    def _ring_addrs(self, q: SplitQueue) -> tuple[int, int, int]:
        return q.iovas() if self.iommu else q.addresses()

    def _park_addrs(self, index: int) -> tuple[int, int, int]:
        base = (self._park_region.gpa if self.iommu else self._park_region.uaddr) + 512 * index
        return base, base + 256, base + 320

    def _stop_queue(self, index: int, why: str) -> None:
        self._queues.pop(index, None)
        self._queue_why[index] = why
        self._queue_stopped(index)

    def _queue_stopped(self, index: int) -> None:
        """A device class forgets what it had in flight on a ring that stopped for good."""

    def _in_flight_into(self, index: int, cut: list[Span]) -> bool:
        """Whether ring `index` has buffers in flight into `cut` (a device class that keeps
        buffers on its rings answers; then the ring is stopped and they are taken off)."""
        return False

    def _take_off(self, index: int, base: int, cut: list[Span], report: InFlight) -> None:
        """Ring `index` is stopped at `base` (the backend's next avail index): a device class
        takes buffers into `cut` off it and says so in `report`."""

    def _retract_locked(
        self, cut: list[Span], report: bool = True, full: bool = True
    ) -> list[_Export]:
        """Takes `cut` away from the backend (lock held); returns the exports removed.

        Order: with an IOTLB, the revoked IOVAs are invalidated (acknowledged) first; the
        vrings in a region that goes (or with buffers in flight into `cut`) are stopped and
        parked; every region whose mapping touches `cut` is removed (or one new table sent
        without them); the kernel must show nothing of `cut` where the backend mapped it;
        only then are the safe pieces added back (at the same frontend addresses) and the
        rings started again where they were, without the buffers into `cut`.

        `full` (a revocation's acknowledgement): the last check reads the backend's whole
        maps after the last message, so a mapping of `cut` anywhere in it is seen. Without
        (a release of pins), where the backend mapped the space before (known from the last
        full read, when no message has gone since) is asked about: what the protocol gave
        it is gone. A mapping it made elsewhere on its own is then seen by the revocation's
        acknowledgement, which refuses.
        """
        if self._window is None or not cut:
            return []
        pid = self.frontend.backend_pid
        before = self._known_mappings(cut)
        affected = [e for e in self._exports.values() if _overlaps(e.span, cut)]
        moving = {
            i: q
            for i, q in self._queues.items()
            if any(exp.lo <= q.offset < exp.hi for exp in affected) or self._in_flight_into(i, cut)
        }
        flight = InFlight(time.monotonic(), _merge(cut))
        bases: dict[int, int] = {}
        try:
            if self.iommu:
                self._invalidate(cut)
            for i in sorted(moving):
                bases[i] = self.frontend.get_vring_base(i)
                self.frontend.set_vring_addr(i, *self._park_addrs(i))
        except VhostUserError as exc:
            raise self._backend_failed(cut, pid, exc) from exc
        for i, base in bases.items():
            self._take_off(i, base, cut, flight)
        if flight.taken_off or flight.in_backend:
            self.revocations.append(flight)
            log.info("in flight into %s: %s", _fmt(cut), flight)
            if self._session is not None:
                self._session.report_in_flight(self.space_id, flight.lost)
        if not affected:
            self._restart(moving, bases)
            still = self._wait_unmapped(cut) if full else self._wait_released(cut, before)
            if still is not None and self.gone is None:
                raise VhostUserError(still)
            return self._settle_stranded(cut)
        held = self._held(cut)
        keep: list[Span] = []
        withdrawn: list[Span] = []
        for exp in affected:
            for piece in _subtract([(exp.lo, exp.hi)], cut):
                (keep if _covered(self._span(*piece), held) else withdrawn).append(piece)
        try:
            for exp in affected:
                del self._exports[exp.lo]
                self._window.unmap(exp.lo, exp.hi)
                # Until the teardown is known to be complete, a hang-up still lets them go.
                self._stranded.append(exp)
            if self.mem_slots:
                for exp in affected:
                    self._table_gen += 1
                    self.frontend.remove_region(exp.region)
            else:
                ro = _subtract(self._read_only(), cut)
                for lo, hi in keep:
                    self._new_export(lo, hi, ro)
                self._publish_table()
        except VhostUserError as exc:
            raise self._backend_failed(cut, pid, exc) from exc
        # Nothing is added after a table (or with no piece to add back): for an
        # acknowledgement this is the last check, and sees every mapping.
        last = full and not (self.mem_slots and keep)
        still = self._wait_unmapped(cut) if last else self._wait_released(cut, before)
        if still is not None:
            raise self._teardown_still(moving, still)
        if not self.frontend.hung_up():
            self._stranded = [e for e in self._stranded if e not in affected]
        added: list[_Export] = []
        if self.mem_slots and keep:
            try:
                added = self._add(keep)
            except VhostUserError as exc:
                withdrawn += keep
                log.warning("could not add %s back: %s", _fmt(keep), exc)
                still = self._wait_unmapped(cut)
                if still is not None:
                    raise VhostUserError(still) from exc
        elif keep:
            added = [self._exports[lo] for lo, _ in keep]
        if full and self.mem_slots and keep:
            # Regions were added after the check above: an acknowledgement needs a full read
            # made after them (adding them made one, if it succeeded).
            seen = self._seen
            fresh = seen[1] if seen is not None and seen[0] == self._table_gen else None
            still = self._wait_unmapped(cut, vmas=fresh)
            if still is not None:
                raise self._teardown_still(moving, still)
        self._restart(moving, bases)
        if self.frontend.hung_up():
            # It answered, then went away (a libvhost-user backend that panics drops the
            # connection): what it did is not known to be what was asked.
            raise self._teardown_failed(
                cut,
                f"the backend (pid {pid}) dropped the connection while {_fmt(cut)} was being "
                "taken from it; not acknowledged",
            )
        if report and withdrawn:
            self._report_withdrawn(_merge(withdrawn))
        if added:
            self._pin_later(added)
        return affected + self._settle_stranded(cut, added)

    def _restart(self, moving: dict[int, SplitQueue], bases: dict[int, int]) -> None:
        """Starts the stopped rings again where they were if their memory is still exported;
        else they stay stopped, with the reason."""
        for i, q in sorted(moving.items()):
            if i not in bases:
                continue
            if self._locate_offset(q.offset, q.end_off, write=True):
                try:
                    self.frontend.setup_vring(
                        i, q.num, *self._ring_addrs(q), self.kick, self.call, bases[i]
                    )
                except VhostUserError as exc:
                    self._stop_queue(i, f"restarting vring {i} failed: {exc}")
            else:
                self._stop_queue(
                    i,
                    f"vring {i} (gpa {q.gpa:#x}+{q.end_off - q.offset:#x}) was stopped: its "
                    "memory is no longer exported (revoked or withdrawn); start_queue() first",
                )

    def _settle_stranded(self, cut: list[Span], pinning: Sequence[_Export] = ()) -> list[_Export]:
        """After a teardown of `cut` checked complete (lock held): the exports an earlier
        teardown took out but could not finish (the backend still mapped them then) that
        touch `cut` are done with (returned: their pins go), and exported regions left
        without a pin meanwhile are pinned (but those in `pinning`, being pinned)."""
        if self.gone is not None or self.frontend.hung_up():
            return []  # the hang-up releases them
        done = [e for e in self._stranded if _overlaps(e.span, cut)]
        self._stranded = [e for e in self._stranded if e not in done]
        unpinned = [e for e in self._exports.values() if not e.pins and e not in pinning]
        if unpinned:
            self._pin_later(unpinned)
        return done

    def _teardown_still(self, moving: dict[int, SplitQueue], still: str) -> VhostUserError:
        """The backend still maps revoked memory after the teardown: the rings stopped for it
        stay stopped."""
        for i in moving:
            self._stop_queue(i, f"vring {i} was stopped for a teardown that failed: {still}")
        return VhostUserError(still)

    def _backend_failed(self, cut: list[Span], pid: int, exc: VhostUserError) -> VhostUserError:
        """The backend failed a message of a teardown: its rings stop, and the revocation of
        `cut` is refused (the error to raise), never acknowledged."""
        what = "dropped the connection" if self.frontend.hung_up() else "failed"
        for i in list(self._queues):
            self._stop_queue(i, f"the backend (pid {pid}) {what}: {exc}")
        return self._teardown_failed(
            cut,
            f"the backend (pid {pid}) {what} while {_fmt(cut)} was being taken from it "
            f"({exc}); not acknowledged",
        )

    def _teardown_failed(self, cut: list[Span], reason: str) -> VhostUserError:
        """Remembers a teardown that failed before the revocation reached this bridge (on a
        release of pins): that revocation is then refused with the same reason."""
        self._failed.append((cut, reason))
        return VhostUserError(reason)

    def _pin_later(self, exports: list[_Export]) -> None:
        # On the session thread calls go over gRPC, so pinning here cannot wait for itself;
        # elsewhere the lock is held: pins then wait until it is let go.
        if self._session is not None and threading.current_thread() is self._session._reader:
            self._pin(exports)
        else:
            threading.Thread(target=self._pin, args=(exports,), daemon=True).start()

    def _declare_isolation(self) -> None:
        """Tells the broker, when it changed, whether the backend holds fds of the space (so
        could map any offset of it: its isolation is logical only). Asked of the kernel (the
        backend's /proc/PID/fd) only for a backend seen keeping fds at the probe."""
        if self._session is None or not self.backend_keeps_fds or self.gone is not None:
            return
        dev, ino = self._dev_ino
        with self._lock:  # one reader of the backend's /proc at a time
            if self._isolation_gen == self._table_gen:
                return  # no message since the last look: nothing it holds has changed
            self._isolation_gen = self._table_gen
            try:
                fds = self.backend.fds_of(dev, ino)
            except OSError:
                fds = []  # the process is gone: it holds nothing
        note = (
            f"the backend (pid {self.frontend.backend_pid}) holds {len(fds)} fd(s) of the "
            "whole space: it could map any offset; only its regions and IOTLB keep it to "
            "what is granted"
            if fds
            else ""
        )
        if note != self.isolation or (note and not self._isolation_told):
            self.isolation = note
            try:
                self._session.declare_isolation(self.space_id, note)
                self._isolation_told = True
            except MembrokerError as exc:
                self._isolation_told = False
                log.warning("cannot tell the broker about the backend's isolation: %s", exc)

    def _rebound(self) -> None:
        """The session resumed with a new daemon, which knows nothing of the isolation note:
        the backend's fds are looked at again and the note told again."""
        with self._lock:
            self._isolation_gen = -1
            self._isolation_told = False
        self._declare_isolation()

    def _report_withdrawn(self, spans: list[Span]) -> None:
        log.warning(
            "withdrawn from the backend although still held (it cannot be exported without "
            "exposing what is not held): %s",
            _fmt(spans),
        )
        if self._session is not None:
            self._session.report_withdrawn(self.space_id, spans)

    @staticmethod
    def _mapping_of(vmas: Sequence[Vma], spans: Sequence[Span]) -> str | None:
        for v in vmas:
            for lo, hi in spans:
                if v.offset < hi and lo < v.file_end:
                    return f"the backend still maps offsets {lo:#x}+{hi - lo:#x} ({v})"
        return None

    def _still_mapped(self, spans: Sequence[Span]) -> str | None:
        """What the backend's maps (a full read: every mapping of the space's file) still
        show of the spans, or None."""
        try:
            vmas = self._space_vmas()
        except OSError:
            return None  # the process is gone: it maps nothing
        return self._mapping_of(vmas, spans)

    def _wait_unmapped(
        self, spans: Sequence[Span], timeout: float = 1.0, vmas: Sequence[Vma] | None = None
    ) -> str | None:
        """Waits until the backend's maps show none of the spans; else what they still show.
        `vmas`: a full read already made after the last message (asked first)."""
        if not spans:
            return None
        deadline = time.monotonic() + timeout
        still = self._mapping_of(vmas, spans) if vmas is not None else self._still_mapped(spans)
        while still is not None:
            if time.monotonic() > deadline:
                return f"{still} after removing its regions"
            time.sleep(0.001)
            still = self._still_mapped(spans)
        return None

    def _known_mappings(self, spans: Sequence[Span]) -> list[Vma] | None:
        """The backend's mappings of the space that touch the spans, when the last full
        read is known to show all it was given (no message since, and the backend
        acknowledges each message only once it has done it: REPLY_ACK); else None."""
        seen = self._seen
        if seen is None or seen[0] != self._table_gen or not self.frontend.reply_ack:
            return None
        return [v for v in seen[1] if _overlaps((v.offset, v.file_end), spans)]

    def _still_at(self, before: Sequence[Vma], spans: Sequence[Span]) -> str | None:
        """What the backend maps of the spans at the addresses of `before` (PROCMAP_QUERY
        over those address ranges only), or None."""
        dev, ino = self._dev_ino
        for old in before:
            try:
                vmas = self.backend.file_mappings_in(old.start, old.end)
            except KernelFeatureMissing:
                return self._still_mapped(spans)
            except OSError:
                return None  # the process is gone: it maps nothing
            still = self._mapping_of([v for v in vmas if (v.dev, v.inode) == (dev, ino)], spans)
            if still is not None:
                return still
        return None

    def _wait_released(
        self, spans: Sequence[Span], before: Sequence[Vma] | None, timeout: float = 1.0
    ) -> str | None:
        """Waits until the backend maps none of the spans where it mapped them before the
        regions changed (`before`, from `_known_mappings`; None: not known, so full reads);
        else what it still maps there."""
        if before is None:
            return self._wait_unmapped(spans, timeout)
        deadline = time.monotonic() + timeout
        while (still := self._still_at(before, spans)) is not None:
            if time.monotonic() > deadline:
                return f"{still} after removing its regions"
            time.sleep(0.001)
        return None

    def refresh(self, seq: int = 0, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Exports what is held but not exported yet (after new grants); returns the held
        (offset, length) pieces left out: those that would expose more than is held, and,
        without an IOTLB (or with a read-only fd), what is held read-only (a backend maps
        every region read-write).

        `seq`: first wait (up to `timeout` seconds, then VhostUserError) until this bridge
        has applied the broker's changes up to that seq (the owner's grant returns it): the
        grant reaches the bridge as a push, after the owner's call returned."""
        client = self.client
        if seq and client is not None:
            deadline = time.monotonic() + timeout
            while client.seq < seq:
                if time.monotonic() > deadline:
                    raise VhostUserError(
                        f"the grants up to seq {seq} did not reach this bridge within "
                        f"{timeout:g} s (it has seq {client.seq})"
                    )
                time.sleep(0.001)
        left = self._export_held()
        if not self._exports_read_only():
            left = _merge(left + self._access()[1])
        return [(lo, hi - lo) for lo, hi in left]

    def exported(self) -> list[MemRegion]:
        with self._lock:
            return [self._exports[k].region for k in sorted(self._exports)]

    # -- liveness ----------------------------------------------------------------------------

    def _start_watch(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="vhost-user-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        p = select.poll()
        p.register(self.frontend.sock, _HANGUP)
        p.register(self._wake, select.POLLIN)
        while True:
            events = p.poll()
            if any(fd == self._wake for fd, _ in events) or self._closing:
                return
            if events:
                self._backend_gone(f"the backend (pid {self.frontend.backend_pid}) hung up")
                return

    def _backend_gone(self, reason: str) -> None:
        """Everything the bridge held for the backend is let go: its regions (here), their
        pins (at the broker), the queue. The attachment stays (its grants are the bridge's;
        `close()` detaches): a later revocation is acknowledged, as nothing is mapped, except
        one whose teardown the hang-up interrupted, which is refused."""
        self.gone_at = time.monotonic()
        self.gone = reason
        log.warning("%s: releasing what the bridge held for it", reason)
        with self._lock:
            exports = list(self._exports.values())
            self._exports.clear()
            # What a teardown the hang-up interrupted had taken out: its revocation is refused
            # (self._failed), and the backend maps nothing any more.
            exports += self._stranded
            self._stranded = []
            for i in sorted(set(self._queues) | set(range(self.NUM_QUEUES))):
                self._stop_queue(i, reason)
            if self._window is not None:
                for exp in exports:
                    self._window.unmap(exp.lo, exp.hi)
        for exp in exports:
            _unpin(exp)
        self._gone_done.set()
        if self.on_backend_gone is not None:
            try:
                self.on_backend_gone(reason)
            except Exception:
                log.exception("on_backend_gone failed")

    def wait_gone(self, timeout: float | None = None) -> bool:
        """Waits until a backend hang-up has been handled; whether it has."""
        return self._gone_done.wait(timeout)

    # -- queues --------------------------------------------------------------------------------

    def _locate(self, gpa: int, length: int, write: bool = False) -> int | None:
        """The space offset of guest-physical [gpa, gpa+length) if one export holds it all
        (and, with `write`, none of it read-only)."""
        for exp in self._exports.values():
            region = exp.region
            if region.gpa <= gpa and gpa + length <= region.gpa + region.size:
                offset = exp.lo + gpa - region.gpa
                if write and _overlaps((offset, offset + length), exp.ro):
                    return None
                return offset
        return None

    def _locate_offset(self, lo: int, hi: int, write: bool = False) -> bool:
        """Whether space bytes [lo, hi) lie in one export (and, with `write`, none of them
        read-only)."""
        return any(
            e.lo <= lo and hi <= e.hi and not (write and _overlaps((lo, hi), e.ro))
            for e in self._exports.values()
        )

    def _start_ring(self, index: int, gpa: int, num: int) -> SplitQueue:
        """Lays vring `index` out at gpa (inside an exported region) and starts it (lock
        held). Ring addresses are frontend addresses, or IOVAs with an IOTLB."""
        if self.gone is not None:
            raise VhostUserError(self.gone)
        off = self._locate(gpa, ring_bytes(num), write=True)
        if off is None or self._window is None:
            raise VhostUserError(
                f"vring {index} at {gpa:#x} is not in an exported region held read-write"
            )
        q = SplitQueue(self._window.mem, off, gpa, num)
        self._queues[index] = q
        self._queue_why.pop(index, None)
        self.frontend.setup_vring(index, num, *self._ring_addrs(q), self.kick, self.call)
        return q

    def close(self) -> None:
        """Ends the connection (the backend unmaps every region when it goes), waits until
        the backend's maps show nothing of the space, then detaches."""
        self._closing = True
        if self._watcher is not None:
            os.eventfd_write(self._wake, 1)
            if self._watcher is not threading.current_thread():
                self._watcher.join(5)
        self._close_backend_channel()
        self.frontend.close()
        with self._lock:
            self._exports.clear()
            self._queues.clear()
            if self._window is not None:
                still = self._wait_unmapped([(0, self._size)])
                if still is not None:
                    log.warning("closing the bridge: %s", still)
                self._window.close()
                self._window = None
        client, self.client = self.client, None
        if client is not None:
            client.close()
        self.backend.close()
        self._close_park()
        for fd in (self.kick, self.call, self._wake):
            try:
                os.close(fd)
            except OSError:
                pass


_B = TypeVar("_B", bound=Bridge)


def ring_bytes(num: int) -> int:
    """Bytes of a split ring of `num` entries (descriptors, avail ring padded to 4, used)."""
    return (16 * num + 4 + 2 * num + 3) // 4 * 4 + 4 + 8 * num


@dataclasses.dataclass(slots=True)
class InFlight:
    """What a revocation found on the rings: buffers into the revoked memory taken off a
    ring before the backend saw them (vring, gpa, length), and buffers the backend had taken
    but not returned when the ring stopped (the same)."""

    at: float
    cut: list[Span]
    taken_off: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    in_backend: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)
    # The space bytes of those buffers inside `cut`, [start, end) merged: what the owner's
    # report lists as in flight.
    lost: list[Span] = dataclasses.field(default_factory=list)

    def lose(self, offset: int, length: int) -> None:
        self.lost = _merge([*self.lost, *_intersect([(offset, offset + length)], self.cut)])


def _unpin(exp: _Export) -> None:
    for pin in exp.pins:
        try:
            pin.unpin()
        except MembrokerError as exc:
            log.warning("unpinning %#x+%#x: %s", pin.offset, pin.length, exc)
    exp.pins = []


class BlkBridge(Bridge):
    """A broker space presented to a vhost-user-blk backend (see `Bridge`). Requests whose
    buffers are not inside an exported region are refused with VIRTIO_BLK_S_IOERR before the
    backend sees them. One request queue (vring 0)."""

    DEVICE = VIRTIO_BLK
    NUM_QUEUES = 1
    IOTLB = False

    @property
    def queue(self) -> SplitQueue | None:
        return self._queues.get(0)

    @property
    def queue_stopped(self) -> str | None:
        return self._queue_why.get(0)

    def start_queue(self, queue_gpa: int) -> None:
        """Lays the virtqueue out at queue_gpa (inside an exported region) and starts it."""
        with self._lock:
            if self.gone is not None:
                raise VhostUserError(self.gone)
            if self._locate(queue_gpa, 16 * self.QUEUE_SIZE + 4096) is None:
                raise VhostUserError(f"queue at {queue_gpa:#x} is not in an exported region")
            q = self._start_ring(0, queue_gpa, self.QUEUE_SIZE)
            self._hdr = queue_gpa + (q.end_off - q.offset + 15) // 16 * 16

    def request(self, kind: int, sector: int, gpa: int, length: int, timeout: float = 5.0) -> int:
        """One virtio-blk request whose data buffer is guest memory [gpa, gpa+length).

        Returns the virtio status; VIRTIO_BLK_S_IOERR without submitting when the buffer is not
        inside memory the bridge exports (a revoked range, say). VhostUserError when there is
        no running queue or the backend hangs up."""
        with self._lock:
            if self.gone is not None:
                raise VhostUserError(self.gone)
            q = self.queue
            if q is None:
                raise VhostUserError(self.queue_stopped or "start_queue() first")
            assert self._window is not None
            mem = self._window.mem
            if length and self._locate(gpa, length, write=kind == VIRTIO_BLK_T_IN) is None:
                return VIRTIO_BLK_S_IOERR
            hdr, status = self._hdr, self._hdr + 16
            hoff = self._locate(hdr, 17, write=True)
            if hoff is None:
                return VIRTIO_BLK_S_IOERR
            mem.write(hoff, struct.pack("<IIQ", kind, 0, sector) + b"\xff")
            chain = [(hdr, 16, False)]
            if length:
                chain.append((gpa, length, kind == VIRTIO_BLK_T_IN))
            chain.append((status, 1, True))
            before = q.used_idx()
            q.submit(chain)
            os.eventfd_write(self.kick, 1)
            deadline = time.monotonic() + timeout
            p = select.poll()
            p.register(self.call, select.POLLIN)
            p.register(self.frontend.sock, _HANGUP)
            # Completion is asynchronous: wait for used.idx to move, not only for the call fd.
            while q.used_idx() == before:
                if time.monotonic() > deadline:
                    raise VhostUserError("the backend did not complete the request")
                for fd, _ in p.poll(10):
                    if fd != self.call:
                        raise VhostUserError(
                            f"the backend (pid {self.frontend.backend_pid}) hung up with a "
                            "request in flight"
                        )
                try:
                    os.eventfd_read(self.call)
                except BlockingIOError:
                    pass
            return mem.read(hoff + 16, 1)[0]
