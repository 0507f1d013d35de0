"""Session frame codec (bytes <-> `Frame`), shared by the SDK and the daemon.

A frame on the wire::

    +----------------+--------------------------------------+
    | u32 LE length  | `membroker.v1.Frame`, `length` bytes |
    +----------------+--------------------------------------+

File descriptors ride as SCM_RIGHTS with the first byte of a frame whose type expects them
(`EXPECTED_FDS`). Received fds queue in arrival order and are taken by the next frame that expects
them; fds left over when no partial frame is pending, or a frame that finds too few, are a
protocol error. This module does no I/O: the session layers feed it bytes and fds.
"""

from __future__ import annotations

import os
import struct

from membroker.errors import ProtocolError
from membroker.v1 import session_pb2 as pb

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<I")
DEFAULT_MAX_FRAME = 64 * 1024
# No frame carries more than one fd; a few may be in flight while a frame's bytes are partial.
MAX_PENDING_FDS = 4
# Frame kinds that carry exactly this many fds; every other kind carries none.
EXPECTED_FDS = {"fd_offer": 1, "fd_delivery": 1, "sealed": 1, "call_channel": 1}


def encode(frame: pb.Frame) -> bytes:
    """The length-prefixed bytes of one frame."""
    body = frame.SerializeToString()
    return HEADER.pack(len(body)) + body


def expected_fds(frame: pb.Frame) -> int:
    kind = frame.WhichOneof("body")
    return EXPECTED_FDS.get(kind or "", 0)


class FrameDecoder:
    """Accumulates received bytes and fds; hands out complete frames with the fds they own.

    The decoder owns the fds it was given until a frame takes them; `close()` closes the rest.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: list[int]) -> list[tuple[pb.Frame, list[int]]]:
        """Adds bytes and owned fds; returns the frames now complete, each with its fds.

        Raises ProtocolError on an oversized, undecodable, empty or fd-mismatched frame; the
        fds still queued are then closed by `close()` (the caller closes the connection).
        """
        self._buf += data
        self._fds.extend(fds)
        if len(self._fds) > MAX_PENDING_FDS:
            raise ProtocolError(f"{len(self._fds)} fds pending, more than any frame carries")
        out: list[tuple[pb.Frame, list[int]]] = []
        try:
            while len(self._buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self._buf)
                if length > self.max_frame:
                    raise ProtocolError(
                        f"frame of {length} bytes exceeds the limit of {self.max_frame}"
                    )
                if len(self._buf) < HEADER.size + length:
                    break
                body = bytes(self._buf[HEADER.size : HEADER.size + length])
                del self._buf[: HEADER.size + length]
                frame = pb.Frame()
                try:
                    frame.ParseFromString(body)
                except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning kinds
                    raise ProtocolError(f"undecodable frame: {exc}") from exc
                kind = frame.WhichOneof("body")
                if kind is None:
                    raise ProtocolError("frame with no known body")
                want = EXPECTED_FDS.get(kind, 0)
                if want > len(self._fds):
                    raise ProtocolError(f"{kind} frame needs {want} fd(s), got {len(self._fds)}")
                taken, self._fds = self._fds[:want], self._fds[want:]
                out.append((frame, taken))
            if self._fds and not self._buf:
                raise ProtocolError(
                    f"{len(self._fds)} unexpected fd(s) with no frame expecting them"
                )
        except ProtocolError:
            for _, taken in out:
                _close_all(taken)
            raise
        return out

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    @property
    def missing_bytes(self) -> int:
        """Bytes still to come to complete the frame whose header is buffered (0: none is).

        Lets a reader size its next recv to a large frame without allocating a large buffer
        for every small one."""
        if len(self._buf) < HEADER.size:
            return 0
        length: int = HEADER.unpack_from(self._buf)[0]
        return max(0, HEADER.size + length - len(self._buf))

    def close(self) -> None:
        """Closes every fd not yet taken by a frame."""
        _close_all(self._fds)
        self._fds = []
        self._buf.clear()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
