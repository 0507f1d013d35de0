"""A vhost-user frontend that presents a broker space to a real backend (vhost-user-blk).

For backend authors and VMMs: `Frontend` speaks the vhost-user protocol on a backend's socket
(QEMU docs/interop/vhost-user.rst); `SplitQueue` is a split virtqueue laid out in guest memory;
`BlkBridge` attaches to a broker space as an fd+offset client, turns the ranges it is granted
into backend memory regions, drives virtio-blk requests through them, and on a revocation
removes the regions and checks the backend's own /proc/PID/maps before it acknowledges (the
backend's reply alone is not proof); while the backend still maps a revoked offset, the
revocation is refused, never acknowledged.

Wire layouts (little endian): header ``u32 request; u32 flags (version 1, 0x4 reply, 0x8
need reply); u32 size``; region ``u64 guest_phys_addr, memory_size, userspace_addr,
mmap_offset``; ADD/REM_MEM_REG ``u64 padding; region``; vring state ``u32 index, num``;
vring addr ``u32 index, flags; u64 desc, used, avail, log``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from membroker._sys import mman
from membroker._sys import sock as sys_sock
from membroker._sys.proc import ProcessView
from membroker.errors import MembrokerError
from membroker.session import Session
from membroker.types import Access, AccessRange

if TYPE_CHECKING:
    from membroker.clients import FdClient

log = logging.getLogger("membroker")

GET_FEATURES, SET_FEATURES, SET_OWNER, SET_MEM_TABLE = 1, 2, 3, 5
MAX_TABLE_REGIONS = 8
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE = 8, 9, 10
SET_VRING_KICK, SET_VRING_CALL = 12, 13
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES = 15, 16
SET_VRING_ENABLE = 18
GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 36, 37, 38

F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 1 << 15

_HEADER = struct.Struct("<III")
_REGION = struct.Struct("<QQQQ")
_VERSION, _REPLY, _NEED_REPLY = 0x1, 0x4, 0x8

VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH = 0, 1, 4
VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR = 0, 1
SECTOR = 512
_DESC_NEXT, _DESC_WRITE = 1, 2


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

    def negotiate(self, features: int, protocol_features: int) -> tuple[int, int]:
        """Feature negotiation and SET_OWNER; returns (features, protocol features) agreed."""
        offered = self.get_u64(GET_FEATURES)
        agreed_proto = 0
        if offered & F_PROTOCOL_FEATURES:
            agreed_proto = self.get_u64(GET_PROTOCOL_FEATURES) & protocol_features
            self.request(SET_PROTOCOL_FEATURES, struct.pack("<Q", agreed_proto))
            self.reply_ack = bool(agreed_proto & PROTOCOL_F_REPLY_ACK)
        self.request(SET_OWNER)
        agreed = offered & (features | F_PROTOCOL_FEATURES)
        self.request(SET_FEATURES, struct.pack("<Q", agreed))
        return agreed, agreed_proto

    def add_region(self, region: MemRegion, fd: int) -> None:
        self.request(ADD_MEM_REG, struct.pack("<Q", 0) + region.pack(), [fd])

    def remove_region(self, region: MemRegion) -> None:
        self.request(REM_MEM_REG, struct.pack("<Q", 0) + region.pack())

    def set_mem_table(self, regions: Sequence[MemRegion], fd: int) -> None:
        """The whole table at once (backends without CONFIGURE_MEM_SLOTS): every region is
        sent with its own copy of the fd."""
        if len(regions) > MAX_TABLE_REGIONS:
            raise VhostUserError(
                f"{len(regions)} regions: SET_MEM_TABLE carries at most {MAX_TABLE_REGIONS}"
            )
        payload = struct.pack("<II", len(regions), 0) + b"".join(r.pack() for r in regions)
        self.request(SET_MEM_TABLE, payload, [fd] * len(regions))

    def setup_vring(
        self, index: int, num: int, desc: int, avail: int, used: int, kick_fd: int, call_fd: int
    ) -> None:
        """Ring addresses are frontend addresses (translated through the regions)."""
        self.request(SET_VRING_NUM, struct.pack("<II", index, num))
        self.request(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, desc, used, avail, 0))
        self.request(SET_VRING_BASE, struct.pack("<II", index, 0))
        self.request(SET_VRING_CALL, struct.pack("<Q", index), [call_fd])
        self.request(SET_VRING_KICK, struct.pack("<Q", index), [kick_fd])
        self.request(SET_VRING_ENABLE, struct.pack("<II", index, 1))

    def close(self) -> None:
        self.sock.close()


class SplitQueue:
    """A split virtqueue in guest memory, driven from the frontend's mapping of it.

    Layout at `base` (guest-physical `gpa`): descriptor table (16 * num), avail ring
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
    range: AccessRange
    region: MemRegion
    mapping: mman.Mapping


def _minus(r: AccessRange, cuts: list[AccessRange]) -> list[AccessRange]:
    """The parts of `r` outside every range of `cuts`."""
    pieces = [(r.offset, r.end)]
    for c in cuts:
        pieces = [
            p
            for lo, hi in pieces
            for p in ((lo, min(hi, c.offset)), (max(lo, c.end), hi))
            if p[0] < p[1]
        ]
    return [AccessRange(lo, hi - lo, r.access) for lo, hi in pieces]


class BlkBridge:
    """A broker space presented to a vhost-user-blk backend, range by range.

    The bridge is the broker's fd+offset client `name`. What it is granted (and shared)
    becomes backend memory regions at gpa = region gpa of the space's layout (identity when
    the space has no layout). The virtqueue lives in the first `queue_bytes` of the first
    granted range; requests whose buffers are not inside a granted range are refused with
    VIRTIO_BLK_S_IOERR before the backend sees them.
    """

    QUEUE_SIZE = 16

    def __init__(
        self, session: Session, space_id: str, backend_socket: str, *, use_mem_slots: bool = True
    ) -> None:
        """use_mem_slots=False sends whole tables (SET_MEM_TABLE) even to a backend that
        offers CONFIGURE_MEM_SLOTS (ADD/REM_MEM_REG)."""
        self._connect(backend_socket, use_mem_slots)
        self.client: FdClient | None = None
        try:
            self.client = session.attach_fd(
                space_id, on_revoke=self._withdraw, on_unpin_request=None
            )
            self._fd = self.client.fd
            info = self.client.info
            self._gpa = info.gpa_of if info.regions else (lambda offset: offset)
            st = os.fstat(self._fd)
            self._dev_ino = (st.st_dev, st.st_ino)
            for r in self.client.ranges():
                self._export(r)
        except BaseException:
            self.close()  # nothing stays attached, mapped or open
            raise

    @classmethod
    def without_broker(cls, fd: int, size: int, backend_socket: str) -> BlkBridge:
        """The same driver over a plain memfd (borrowed) exported whole, gpa = offset: what
        a VMM does without a broker, the benchmark's baseline."""
        self = cls.__new__(cls)
        self._connect(backend_socket)
        self.client = None
        self._fd = fd
        self._gpa = lambda offset: offset
        st = os.fstat(fd)
        self._dev_ino = (st.st_dev, st.st_ino)
        self._export(AccessRange(0, size, Access.RW))
        return self

    def _connect(self, backend_socket: str, use_mem_slots: bool = True) -> None:
        self.client = None
        self.frontend = Frontend(backend_socket)
        self._lock = threading.RLock()
        self._exports: dict[int, _Export] = {}
        self.queue: SplitQueue | None = None
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.backend = ProcessView(self.frontend.backend_pid)
            self.features, self.protocol_features = self.frontend.negotiate(
                VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH,
                PROTOCOL_F_REPLY_ACK | (PROTOCOL_F_CONFIGURE_MEM_SLOTS if use_mem_slots else 0),
            )
            self.mem_slots = bool(self.protocol_features & PROTOCOL_F_CONFIGURE_MEM_SLOTS)
        except BaseException:
            if hasattr(self, "backend"):
                self.backend.close()
            self.frontend.close()
            os.close(self.kick)
            os.close(self.call)
            raise

    # -- regions -----------------------------------------------------------------------------

    def _export(self, r: AccessRange) -> None:
        with self._lock:
            mapping = mman.Mapping.map_shared(
                self._fd, r.length, mman.PROT_READ | mman.PROT_WRITE, r.offset
            )
            region = MemRegion(
                gpa=self._gpa(r.offset), size=r.length, uaddr=mapping.address, mmap_offset=r.offset
            )
            self._exports[r.offset] = _Export(r, region, mapping)
            if self.mem_slots:
                self.frontend.add_region(region, self._fd)
            else:
                self._publish_table()
            # The backend's reply is not proof of what it mapped: ask the kernel. A backend
            # built on libvhost-user before QEMU 9 maps a region from file offset 0, i.e.
            # [0, mmap_offset + size): memory this bridge was never granted.
            over = self._overmapped()
            if over is not None:
                self._withdraw([r])
                raise VhostUserError(
                    f"the backend (pid {self.frontend.backend_pid}) maps offsets "
                    f"{over[0]:#x}-{over[1]:#x} of the space for a region of "
                    f"{r.offset:#x}+{r.length:#x}: more than granted (old libvhost-user maps "
                    "regions from file offset 0); region withdrawn"
                )

    def _publish_table(self) -> None:
        self.frontend.set_mem_table([e.region for e in self._exports.values()], self._fd)

    def _overmapped(self) -> tuple[int, int] | None:
        """A file range the backend maps outside every exported range, if any."""
        dev, ino = self._dev_ino
        exported = sorted((e.range.offset, e.range.end) for e in self._exports.values())
        for vma in self.backend.mappings_of(dev, ino):
            lo = vma.offset
            for start, end in exported:
                if lo < start:
                    return lo, min(start, vma.file_end)
                lo = max(lo, end)
                if lo >= vma.file_end:
                    break
            if lo < vma.file_end:
                return lo, vma.file_end
        return None

    def _withdraw(self, ranges: list[AccessRange]) -> None:
        """On a revocation (session thread): remove every region touching the ranges, wait
        until the backend's own maps no longer show them, and export again what is still held
        of those regions.

        Raises VhostUserError while the backend still maps any revoked offset (its reply is
        not proof; its /proc/PID/maps is): the SDK then refuses the revocation instead of
        acknowledging it. A piece that cannot be exported again is only logged, once the maps
        show the revoked offsets gone.
        """
        with self._lock:
            keep: list[AccessRange] = []
            problems: list[str] = []
            for offset, exp in list(self._exports.items()):
                if not any(exp.range.offset < r.end and r.offset < exp.range.end for r in ranges):
                    continue
                del self._exports[offset]
                try:
                    if self.mem_slots:
                        self.frontend.remove_region(exp.region)
                    else:
                        self._publish_table()
                except VhostUserError as exc:
                    # Whether it still maps the region is the kernel's to say, just below.
                    problems.append(f"removing region at gpa {exp.region.gpa:#x}: {exc}")
                if self.queue is not None and self.queue.mem is exp.mapping:
                    self.queue = None
                exp.mapping.close()
                keep += _minus(exp.range, ranges)
            # Every revoked offset, exported or not: none may stay reachable by the backend.
            still = self._wait_unmapped(ranges)
            if still is not None:
                raise VhostUserError("; ".join([still, *problems]))
            failed_export = False
            for piece in keep:
                try:
                    self._export(piece)
                except VhostUserError as exc:
                    failed_export = True
                    log.warning(
                        "cannot export %#x+%#x again after a revocation: %s",
                        piece.offset,
                        piece.length,
                        exc,
                    )
            if failed_export:
                # A backend that maps more than a region (old libvhost-user maps from file
                # offset 0) may have reached revoked offsets through the re-export.
                still = self._wait_unmapped(ranges)
                if still is not None:
                    raise VhostUserError(still)

    def _still_mapped(self, ranges: list[AccessRange]) -> str | None:
        """What the backend's maps still show of the ranges, or None."""
        dev, ino = self._dev_ino
        for v in self.backend.mappings_of(dev, ino):
            for r in ranges:
                if v.offset < r.end and r.offset < v.file_end:
                    return f"the backend still maps offsets {r.offset:#x}+{r.length:#x} ({v})"
        return None

    def _wait_unmapped(self, ranges: list[AccessRange], timeout: float = 1.0) -> str | None:
        """Waits until the backend's maps show none of the ranges; else what they still show."""
        if not ranges:
            return None
        deadline = time.monotonic() + timeout
        while True:
            still = self._still_mapped(ranges)
            if still is None:
                return None
            if time.monotonic() > deadline:
                return f"{still} after removing its regions"
            time.sleep(0.001)

    def refresh(self) -> None:
        """Exports what is held but not exported yet (after new grants)."""
        if self.client is None:
            return
        with self._lock:
            have = [e.range for e in self._exports.values()]
            for r in self.client.ranges():
                for piece in _minus(r, have):
                    self._export(piece)

    def exported(self) -> list[MemRegion]:
        with self._lock:
            return [e.region for e in self._exports.values()]

    # -- virtio-blk ------------------------------------------------------------------------------

    def _locate(self, gpa: int, length: int) -> tuple[_Export, int] | None:
        for exp in self._exports.values():
            if exp.region.gpa <= gpa and gpa + length <= exp.region.gpa + exp.region.size:
                return exp, gpa - exp.region.gpa
        return None

    def start_queue(self, queue_gpa: int) -> None:
        """Lays the virtqueue out at queue_gpa (inside an exported region) and starts it."""
        with self._lock:
            found = self._locate(queue_gpa, 16 * self.QUEUE_SIZE + 4096)
            if found is None:
                raise VhostUserError(f"queue at {queue_gpa:#x} is not in an exported region")
            exp, off = found
            self.queue = SplitQueue(exp.mapping, off, queue_gpa, self.QUEUE_SIZE)
            desc, avail, used = self.queue.addresses()
            self.frontend.setup_vring(0, self.QUEUE_SIZE, desc, avail, used, self.kick, self.call)
            self._hdr = queue_gpa + (self.queue.end_off - off + 15) // 16 * 16

    def request(self, kind: int, sector: int, gpa: int, length: int, timeout: float = 5.0) -> int:
        """One virtio-blk request whose data buffer is guest memory [gpa, gpa+length).

        Returns the virtio status; VIRTIO_BLK_S_IOERR without submitting when the buffer is not
        inside memory the bridge holds (a revoked range, say)."""
        with self._lock:
            q = self.queue
            if q is None:
                raise VhostUserError("start_queue() first")
            if length and self._locate(gpa, length) is None:
                return VIRTIO_BLK_S_IOERR
            hdr, status = self._hdr, self._hdr + 16
            hexp, hoff = self._locate(hdr, 17) or (None, 0)
            if hexp is None:
                return VIRTIO_BLK_S_IOERR
            hexp.mapping.write(hoff, struct.pack("<IIQ", kind, 0, sector) + b"\xff")
            chain = [(hdr, 16, False)]
            if length:
                chain.append((gpa, length, kind == VIRTIO_BLK_T_IN))
            chain.append((status, 1, True))
            before = q.used_idx()
            q.submit(chain)
            os.eventfd_write(self.kick, 1)
            deadline = time.monotonic() + timeout
            # Completion is asynchronous: wait for used.idx to move, not only for the call fd.
            while q.used_idx() == before:
                if time.monotonic() > deadline:
                    raise VhostUserError("the backend did not complete the request")
                select.select([self.call], [], [], 0.01)
                try:
                    os.eventfd_read(self.call)
                except BlockingIOError:
                    pass
            return hexp.mapping.read(hoff + 16, 1)[0]

    def close(self) -> None:
        with self._lock:
            for exp in self._exports.values():
                exp.mapping.close()
            self._exports.clear()
        if self.client is not None:
            self.client.close()
        self.frontend.close()
        self.backend.close()
        os.close(self.kick)
        os.close(self.call)
