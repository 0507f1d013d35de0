"""A virtio-net device class for the vhost-user bridge (tested against DPDK testpmd).

`NetBridge` is a `membroker.vhost_user.Bridge` that drives a receive ring (vring 0) and a
transmit ring (vring 1) in broker memory. Every buffer is one descriptor holding the 12-byte
`virtio_net_hdr_mrg_rxbuf` (VIRTIO_F_VERSION_1) followed by the frame. A buffer is put on a
ring only when all of it lies in memory the bridge exports to the backend; on a revocation,
buffers into the revoked memory still on a ring (not yet taken by the backend) are taken off
it while the ring is stopped, so the backend never receives into (or sends from) memory it
no longer has; `revocations` says what was in flight, and so does the acknowledgement (the
owner's report lists the buffers as in flight). A receive buffer must be held read-write; a
transmit buffer the driver wrote itself (`post_tx`) need only be readable by the device.
"""

from __future__ import annotations

import dataclasses
import os
import select
import struct
import time

from membroker.vhost_user import (
    _DESC_WRITE,
    VIRTIO_NET,
    Bridge,
    InFlight,
    Span,
    SplitQueue,
    VhostUserError,
    _overlaps,
    ring_bytes,
)

RX, TX = 0, 1
# virtio_net_hdr_mrg_rxbuf: u8 flags, gso_type; u16 hdr_len, gso_size, csum_start,
# csum_offset, num_buffers.
NET_HDR = struct.Struct("<BBHHHHH")
HDR_LEN = NET_HDR.size


@dataclasses.dataclass(frozen=True, slots=True)
class Buffer:
    """A buffer on a ring: guest-physical address, length, and its space offset."""

    gpa: int
    length: int
    offset: int


@dataclasses.dataclass(frozen=True, slots=True)
class Packet:
    """A received buffer: where it was and what the device wrote (header and frame)."""

    gpa: int
    data: bytes

    @property
    def header(self) -> bytes:
        return self.data[:HDR_LEN]

    @property
    def frame(self) -> bytes:
        return self.data[HDR_LEN:]


class NetBridge(Bridge):
    """A broker space presented to a vhost-user-net backend (see `Bridge` for what is
    acknowledged, and how). Negotiates VERSION_1 and MRG_RXBUF (so the device writes
    num_buffers), nothing else of virtio-net: no offloads, no control queue."""

    DEVICE = VIRTIO_NET
    NUM_QUEUES = 2
    QUEUE_SIZE = 64

    def _connect(self, backend_socket: str, use_mem_slots: bool, iommu: bool) -> None:
        self._posted: dict[int, dict[int, Buffer]] = {RX: {}, TX: {}}
        self._free: dict[int, list[int]] = {RX: [], TX: []}
        self._last_used: dict[int, int] = {RX: 0, TX: 0}
        self._received: list[Packet] = []
        self.sent = 0
        super()._connect(backend_socket, use_mem_slots, iommu)

    def start_queues(self, ring_gpa: int) -> None:
        """Lays out the receive ring at ring_gpa and the transmit ring on the next page (in
        exported memory) and starts both."""
        with self._lock:
            step = (ring_bytes(self.QUEUE_SIZE) + 4095) // 4096 * 4096
            for index, gpa in ((RX, ring_gpa), (TX, ring_gpa + step)):
                if index in self._queues and self.gone is None:
                    # A running ring is stopped before it is laid out again; what was on it
                    # is forgotten (the backend resumes nothing of it).
                    self.frontend.get_vring_base(index)
                self._start_ring(index, gpa, self.QUEUE_SIZE)
                self._posted[index] = {}
                self._free[index] = list(range(self.QUEUE_SIZE))
                self._last_used[index] = 0

    def _queue(self, index: int) -> SplitQueue:
        if self.gone is not None:
            raise VhostUserError(self.gone)
        q = self._queues.get(index)
        if q is None:
            raise VhostUserError(self._queue_why.get(index) or "start_queues() first")
        return q

    def _buffer(self, gpa: int, length: int, write: bool) -> Buffer:
        if self.gone is not None:
            raise VhostUserError(self.gone)
        offset = self._locate(gpa, length, write)
        if offset is None:
            if write and self._locate(gpa, length) is not None:
                raise VhostUserError(
                    f"buffer {gpa:#x}+{length:#x} is held read-only: the device may not "
                    "write it (not put on the ring)"
                )
            raise VhostUserError(
                f"buffer {gpa:#x}+{length:#x} is not in memory exported to the backend "
                "(not granted, revoked or withdrawn): not put on the ring"
            )
        return Buffer(gpa, length, offset)

    def _put(self, index: int, buf: Buffer, flags: int) -> int:
        q = self._queue(index)
        self._reap(index)
        if not self._free[index]:
            raise VhostUserError(f"vring {index} is full ({self.QUEUE_SIZE} buffers in flight)")
        head = self._free[index].pop()
        q.write_desc(head, buf.gpa, buf.length, flags)
        self._posted[index][head] = buf
        q.publish(head)
        os.eventfd_write(self.kick, 1)
        return head

    def post_rx(self, gpa: int, length: int) -> int:
        """Gives the device a receive buffer [gpa, gpa+length); refused (VhostUserError)
        when it is not all in exported memory. Returns its descriptor id."""
        with self._lock:
            if length <= HDR_LEN:
                raise VhostUserError(f"a receive buffer needs more than {HDR_LEN} bytes")
            return self._put(RX, self._buffer(gpa, length, write=True), _DESC_WRITE)

    def post_tx(self, gpa: int, length: int) -> int:
        """Puts a buffer the driver wrote itself (a 12-byte header, then the frame) on the
        transmit ring: the device only reads it, so read-only memory will do. Returns its
        descriptor id."""
        with self._lock:
            if length <= HDR_LEN:
                raise VhostUserError(f"a transmit buffer needs more than {HDR_LEN} bytes")
            head = self._put(TX, self._buffer(gpa, length, write=False), 0)
            self.sent += 1
            return head

    def send(self, gpa: int, frame: bytes) -> int:
        """Writes a zero header (no offloads) and `frame` at gpa (exported memory) and puts
        it on the transmit ring. Returns its descriptor id."""
        with self._lock:
            buf = self._buffer(gpa, HDR_LEN + len(frame), write=True)
            self._queue(TX)
            assert self._window is not None
            self._window.mem.write(buf.offset, bytes(HDR_LEN) + frame)
            head = self._put(TX, buf, 0)
            self.sent += 1
            return head

    def _reap(self, index: int) -> None:
        """Takes what the device has returned on ring `index` (lock held)."""
        q = self._queues.get(index)
        if q is None:
            return
        used = q.used_idx()
        while self._last_used[index] != used:
            head, written = q.used_elem(self._last_used[index])
            self._last_used[index] = (self._last_used[index] + 1) & 0xFFFF
            buf = self._posted[index].pop(head, None)
            if buf is None:
                raise VhostUserError(
                    f"the backend returned descriptor {head} of vring {index}, "
                    "which was not in flight"
                )
            self._free[index].append(head)
            if index == RX and self._window is not None:
                n = min(written, buf.length)
                # Read only while it is still exported (it is mapped here only then).
                if self._locate(buf.gpa, buf.length) is not None:
                    data = self._window.mem.read(buf.offset, n)
                    self._received.append(Packet(buf.gpa, data))

    def receive(self, count: int = 1, timeout: float = 2.0) -> list[Packet]:
        """Waits until `count` packets have been received (or the timeout); returns what
        was received (and collects finished transmissions)."""
        deadline = time.monotonic() + timeout
        p = select.poll()
        p.register(self.call, select.POLLIN)
        while True:
            with self._lock:
                self._queue(RX)
                self._reap(RX)
                self._reap(TX)
                if len(self._received) >= count or time.monotonic() > deadline:
                    out, self._received = self._received, []
                    return out
            p.poll(1)
            try:
                os.eventfd_read(self.call)
            except BlockingIOError:
                pass

    def in_flight(self) -> dict[int, list[Buffer]]:
        """The buffers on each ring the device has not returned yet."""
        with self._lock:
            for index in (RX, TX):
                self._reap(index)
            return {i: list(self._posted[i].values()) for i in (RX, TX)}

    # -- revocations (called by Bridge with the lock held) ------------------------------------

    def _in_flight_into(self, index: int, cut: list[Span]) -> bool:
        return any(
            _overlaps((b.offset, b.offset + b.length), cut) for b in self._posted[index].values()
        )

    def _take_off(self, index: int, base: int, cut: list[Span], report: InFlight) -> None:
        """The ring is stopped; the backend resumes at avail index `base`. Entries from
        `base` on were never seen by it: those into `cut` are taken off (the rest keep their
        order). Entries it took and has not returned are reported."""
        q = self._queues.get(index)
        if q is None:
            return
        self._reap(index)
        pending = (q.avail_idx - base) & 0xFFFF
        heads = [q.avail_entry(base + i) for i in range(pending)]
        keep = []
        for head in heads:
            buf = self._posted[index].get(head)
            if buf is not None and _overlaps((buf.offset, buf.offset + buf.length), cut):
                del self._posted[index][head]
                self._free[index].append(head)
                report.taken_off.append((index, buf.gpa, buf.length))
                report.lose(buf.offset, buf.length)
            else:
                keep.append(head)
        if len(keep) != len(heads):
            q.rewrite_avail(base, keep)
        for head, buf in self._posted[index].items():
            if head not in heads and _overlaps((buf.offset, buf.offset + buf.length), cut):
                report.in_backend.append((index, buf.gpa, buf.length))
                report.lose(buf.offset, buf.length)

    def _queue_stopped(self, index: int) -> None:
        self._posted[index] = {}
        self._free[index] = []
