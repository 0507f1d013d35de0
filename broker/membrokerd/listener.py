"""The session socket: accepts connections on session.sock and runs each as a `Connection`.

A connection is a raw non-blocking Unix stream socket driven by the event loop's add_reader /
add_writer (an asyncio transport cannot carry SCM_RIGHTS under uvloop). It knows frames and fds,
not policy: complete frames go to the broker core (`SessionHost`), which decides what they mean.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from membroker import wire
from membroker._sys import sock as sys_sock
from membroker.errors import ProtocolError
from membroker.v1 import session_pb2 as spb

log = logging.getLogger("membrokerd.session")

RECV_BYTES = 256 * 1024


class SessionHost(Protocol):
    """What the broker core offers connections."""

    def on_frame(self, conn: Connection, frame: spb.Frame, fds: list[int]) -> None: ...

    def on_closed(self, conn: Connection) -> None: ...

    def on_protocol_error(self, conn: Connection, error: ProtocolError) -> None: ...


class Connection:
    """One accepted session socket: reads frames, queues writes, owns the peer's pidfd."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        host: SessionHost,
        max_frame: int,
        cred: sys_sock.PeerCred,
        pidfd: int,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.host = host
        self.cred = cred
        self.pidfd = pidfd
        self.accepted_at = time.monotonic()
        self.closed = False
        self.close_reason = ""
        self._decoder = wire.FrameDecoder(max_frame)
        self._out: collections.deque[tuple[memoryview, Sequence[int]]] = collections.deque()
        self._writing = False
        loop.add_reader(sock.fileno(), self._on_readable)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Connection pid={self.cred.pid} uid={self.cred.uid} {state}>"

    # -- reading -----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self.closed:
            return
        try:
            data, fds, truncated = sys_sock.recv_with_fds(self.sock, RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        if truncated:
            _close_fds(fds)
            self._protocol_error(ProtocolError("control data truncated (too many fds)"))
            return
        if not data:
            _close_fds(fds)
            if self._decoder.pending_bytes:
                self.close(f"peer closed mid-frame ({self._decoder.pending_bytes} bytes pending)")
            else:
                self.close("peer closed")
            return
        try:
            frames = self._decoder.feed(data, fds)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        for index, (frame, frame_fds) in enumerate(frames):
            if self.closed:
                for _, rest in frames[index:]:
                    _close_fds(rest)
                return
            try:
                self.host.on_frame(self, frame, frame_fds)
            except Exception:
                # A bug of ours must cost this connection at most, never the daemon.
                log.exception("session of pid %d: frame handling failed", self.cred.pid)
                self._protocol_error(ProtocolError("internal error handling a frame", code=13))
                for _, rest in frames[index + 1 :]:
                    _close_fds(rest)
                return

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.host.on_protocol_error(self, exc)
        self.send(spb.Frame(error=spb.Error(code=exc.code, message=str(exc))))
        self.close(f"protocol error: {exc}")

    # -- writing -----------------------------------------------------------------------------

    def send(self, frame: spb.Frame, fds: Sequence[int] = ()) -> None:
        """Queues one frame (fds borrowed: they are duplicated by the kernel at send time)."""
        self.send_encoded(wire.encode(frame), fds)

    def send_encoded(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Queues one already encoded frame (a fan-out encodes a shared frame once)."""
        if self.closed:
            return
        self._out.append((memoryview(data), tuple(fds)))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._out and not self.closed:
            data, fds = self._out[0]
            try:
                sent = sys_sock.send_with_fds(self.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.close(f"send failed: {exc}")
                return
            if sent == len(data):
                self._out.popleft()
                continue
            # Partial: the fds went with the first byte; never send them twice.
            self._out[0] = (data[sent:], ())
            if not self._writing:
                self._writing = True
                self.loop.add_writer(self.sock.fileno(), self._on_writable)
            return
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    def _on_writable(self) -> None:
        self._flush()

    # -- closing -----------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Closes the socket, the pidfd and every fd not yet taken; tells the host once."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        fileno = self.sock.fileno()
        self.loop.remove_reader(fileno)
        if self._writing:
            self.loop.remove_writer(fileno)
        # Last words (an Error or Goodbye frame) go out if the socket has room; never wait.
        for data, fds in self._out:
            try:
                if sys_sock.send_with_fds(self.sock, data, fds) != len(data):
                    break
            except OSError:
                break
        self._out.clear()
        self._decoder.close()
        self.sock.close()
        os.close(self.pidfd)
        log.debug("session of pid %d closed: %s", self.cred.pid, reason)
        self.host.on_closed(self)


class Listener:
    """The listening session socket; hands each accepted connection to the host."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, path: Path, mode: int, accept: SessionAcceptor
    ) -> None:
        self.loop = loop
        self.path = path
        self._accept_cb = accept
        if path.exists() or path.is_symlink():
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o777 & ~mode)
            try:
                self.sock.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, mode)
            self.sock.listen(128)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        for _ in range(64):
            try:
                conn_sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            conn_sock.setblocking(False)
            try:
                cred = sys_sock.peer_credentials(conn_sock)
                pidfd = sys_sock.peer_pidfd(conn_sock)
            except OSError as exc:
                log.warning("cannot identify a session peer: %s", exc)
                conn_sock.close()
                continue
            self._accept_cb(conn_sock, cred, pidfd)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class SessionAcceptor(Protocol):
    def __call__(self, sock: socket.socket, cred: sys_sock.PeerCred, pidfd: int) -> None: ...


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
