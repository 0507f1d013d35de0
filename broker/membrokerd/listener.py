"""The session socket: accepts connections on session.sock and runs each as a `Connection`.

A connection is a raw non-blocking Unix stream socket driven by the event loop's add_reader /
add_writer (an asyncio transport cannot carry SCM_RIGHTS under uvloop). It knows frames and fds,
not policy: complete frames go to the broker core (`SessionHost`), which decides what they mean.

Every buffer a peer can fill is bounded: at most `RECV_BYTES` are read and `FRAMES_PER_WAKEUP`
frames handed on per loop turn (the rest wait for the next turn, so one busy peer cannot starve
the others); frames queued to a peer that does not read make the connection stop reading from it
(`outbound_pause_bytes`) and, at `max_outbound_bytes`, close it.

The socket files (session.sock here, control.sock for the server) are claimed, never stolen: a
path where a server answers makes the daemon refuse to start (`StartupRefused`), a stale one is
replaced atomically, and at shutdown only the very file this process bound is removed.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import functools
import logging
import os
import socket
import stat
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from membroker import wire
from membroker._sys import sock as sys_sock
from membroker.errors import ProtocolError
from membroker.v1 import session_pb2 as spb

log = logging.getLogger("membrokerd.session")

# One recvmsg per wakeup: 64 KiB costs ~1.4 us, 256 KiB ~12 us (and a frame never needs more
# than one read of its own: the decoder keeps partial frames across reads).
RECV_BYTES = 64 * 1024
# Frames handed to the host per wakeup; more complete frames wait for the next loop turn.
FRAMES_PER_WAKEUP = 256
DEFAULT_MAX_OUTBOUND_BYTES = 64 * 1024 * 1024
DEFAULT_OUTBOUND_PAUSE_BYTES = 256 * 1024


# Frames smaller than this are copied into a shared buffer of at most this size; bigger ones are
# queued as they are.
COALESCE_BYTES = 16 * 1024
# How long a closed connection's socket stays open to deliver its last words (a Goodbye or an
# Error) to a peer that is behind in reading: then it is closed whatever is left.
LINGER_S = 2.0


class _Chunk:
    """Bytes queued to a peer, sent from `offset` on; `fds` travel with the first byte.

    Frames without fds may be appended to the last chunk (`data` a bytearray): their bytes simply
    follow. A frame with fds always starts a chunk of its own, so its fds leave with its first
    byte, as the receiver's decoder expects.
    """

    __slots__ = ("data", "fds", "offset")

    def __init__(self, data: bytes | bytearray, fds: tuple[int, ...]) -> None:
        self.data = data
        self.fds = fds
        self.offset = 0

    @property
    def pending(self) -> int:
        return len(self.data) - self.offset

    def send(self, sock: socket.socket) -> int:
        """One sendmsg of what is left; returns the bytes sent (raises like send_with_fds)."""
        # The views are released before returning: a bytearray with a live export could not
        # grow when the next small frame is appended.
        with memoryview(self.data) as whole, whole[self.offset :] as rest:
            sent = sys_sock.send_with_fds(sock, rest, self.fds if self.offset == 0 else ())
        # Partial or not, the fds went with the first byte: never send them twice.
        self.offset += sent
        return sent


class StartupRefused(OSError):
    """The daemon must not start here (another one serves, a file is in the way, an unsafe
    runtime directory); str() is the whole one-line reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class SessionHost(Protocol):
    """What the broker core offers connections."""

    def on_frame(self, conn: Connection, frame: spb.Frame, fds: list[int]) -> None: ...

    def on_closed(self, conn: Connection) -> None: ...

    def on_protocol_error(self, conn: Connection, error: ProtocolError) -> None: ...


class Connection:
    """One accepted session socket: reads frames, queues writes, owns the peer's pidfd.

    State a test or a metric may read: `queued_bytes` (bytes queued to the peer, not yet taken
    by its socket), `paused` (reading stopped because the peer does not drain them), `closed`
    and `close_reason`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        host: SessionHost,
        max_frame: int,
        cred: sys_sock.PeerCred,
        pidfd: int,
        *,
        max_outbound_bytes: int = DEFAULT_MAX_OUTBOUND_BYTES,
        outbound_pause_bytes: int = DEFAULT_OUTBOUND_PAUSE_BYTES,
        recv_bytes: int = RECV_BYTES,
        frames_per_wakeup: int = FRAMES_PER_WAKEUP,
    ) -> None:
        if not 0 < outbound_pause_bytes < max_outbound_bytes:
            raise ValueError(
                f"outbound_pause_bytes {outbound_pause_bytes} must be positive and below "
                f"max_outbound_bytes {max_outbound_bytes}"
            )
        self.loop = loop
        self.sock = sock
        self.host = host
        self.cred = cred
        self.pidfd = pidfd
        self.max_outbound_bytes = max_outbound_bytes
        self.outbound_pause_bytes = outbound_pause_bytes
        self.recv_bytes = recv_bytes
        self.frames_per_wakeup = frames_per_wakeup
        self.accepted_at = time.monotonic()
        self.closed = False
        self.close_reason = ""
        self.queued_bytes = 0
        self.paused = False
        # Every frame must come from the process that connected (SO_PEERCRED), whose memory
        # the broker verifies: a session handed to another process (the socket passed over
        # SCM_RIGHTS, or inherited by a fork) would have a decoy answer for it.
        sys_sock.pass_credentials(sock)
        self._decoder = wire.FrameDecoder(max_frame)
        # Decoded frames not yet handed to the host; they own their fds until handed.
        self._ready: collections.deque[tuple[spb.Frame, list[int]]] = collections.deque()
        self._dispatch_scheduled = False
        self._out: collections.deque[_Chunk] = collections.deque()
        self._writing = False
        self._reading = False
        # Over max_outbound_bytes: the queue is dropped and the close is one loop turn away.
        self._overflowed = False
        self._update_reading()

    def __repr__(self) -> str:
        if self.closed:
            state = "closed"
        elif self._overflowed:
            state = "dropping"
        else:
            state = "paused" if self.paused else "open"
        return (
            f"<Connection pid={self.cred.pid} uid={self.cred.uid} {state} "
            f"queued={self.queued_bytes}>"
        )

    def _update_reading(self) -> None:
        """Reads from the peer only while it drains what we send and its frames are handled."""
        want = not (self.closed or self._overflowed or self.paused or self._ready)
        if want == self._reading:
            return
        self._reading = want
        if want:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)
        else:
            self.loop.remove_reader(self.sock.fileno())

    # -- reading -----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self.closed or not self._reading:
            return
        try:
            data, fds, truncated, sender = sys_sock.recv_with_fds_and_sender(
                self.sock, self.recv_bytes
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        if sender is not None and sender != self.cred.pid and data:
            _close_fds(fds)
            self.protocol_error(
                ProtocolError(
                    f"bytes sent by pid {sender} on the session of pid {self.cred.pid}: a "
                    "session belongs to the process that connected, and is not handed on",
                    code=7,
                )
            )
            return
        if truncated:
            _close_fds(fds)
            self.protocol_error(ProtocolError("control data truncated (too many fds)"))
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
            self.protocol_error(exc)
            return
        self._ready.extend(frames)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hands at most `frames_per_wakeup` ready frames to the host; schedules the rest."""
        self._dispatch_scheduled = False
        handed = 0
        while self._ready and not (self.closed or self._overflowed or self.paused):
            if handed == self.frames_per_wakeup:
                # Fairness: other connections (and timers) get this loop turn.
                self._dispatch_scheduled = True
                self.loop.call_soon(self._dispatch)
                break
            frame, frame_fds = self._ready.popleft()  # the host owns frame_fds from here
            handed += 1
            try:
                self.host.on_frame(self, frame, frame_fds)
            except Exception:
                # A bug of ours must cost this connection at most, never the daemon.
                log.exception("session of pid %d: frame handling failed", self.cred.pid)
                self.protocol_error(ProtocolError("internal error handling a frame", code=13))
                return
        self._update_reading()

    def _schedule_dispatch(self) -> None:
        if self._ready and not self._dispatch_scheduled and not self.closed:
            self._dispatch_scheduled = True
            self.loop.call_soon(self._dispatch)

    def protocol_error(self, exc: ProtocolError) -> None:
        """Counts and logs it (the host's `on_protocol_error`), then closes the connection with
        an Error frame saying why."""
        self.host.on_protocol_error(self, exc)
        self.close(
            f"protocol error: {exc}",
            last_words=spb.Frame(error=spb.Error(code=exc.code, message=str(exc))),
        )

    # -- writing -----------------------------------------------------------------------------

    def send(self, frame: spb.Frame, fds: Sequence[int] = ()) -> None:
        """Queues one frame (fds borrowed: they are duplicated by the kernel at send time)."""
        self.send_encoded(wire.encode(frame), fds)

    def send_encoded(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Queues one already encoded frame (a fan-out encodes a shared frame once).

        Never closes the connection under the caller: a peer over `max_outbound_bytes` has its
        queue dropped at once and is closed on the next loop turn (later sends are dropped).
        """
        if self.closed or self._overflowed:
            return
        tail = self._out[-1] if self._out else None
        if (
            not fds
            and tail is not None
            and isinstance(tail.data, bytearray)
            and len(tail.data) + len(data) <= COALESCE_BYTES
        ):
            # Small frames share one buffer: a queue of 30,000 pongs is 270 KB, not 30,000
            # Python objects (~10 MB), and leaves in a few sendmsg calls instead of 30,000.
            tail.data += data
        elif len(data) < COALESCE_BYTES:
            self._out.append(_Chunk(bytearray(data), tuple(fds)))
        else:
            self._out.append(_Chunk(data, tuple(fds)))  # shared by a fan-out: never copied
        self.queued_bytes += len(data)
        if not self._writing:
            self._flush()
        if self.closed:
            return
        if self.queued_bytes > self.max_outbound_bytes:
            self._overflow()
        elif self.queued_bytes > self.outbound_pause_bytes and not self.paused:
            self.paused = True
            self._update_reading()
            log.debug(
                "session of pid %d: %d bytes queued, not reading from it until they drain",
                self.cred.pid,
                self.queued_bytes,
            )

    def _overflow(self) -> None:
        reason = (
            f"peer does not read: {self.queued_bytes} bytes queued "
            f"(limit max_outbound_bytes = {self.max_outbound_bytes})"
        )
        log.warning("session of pid %d: %s", self.cred.pid, reason)
        self._overflowed = True
        # Free the memory now, but for the rest of a half-sent head frame (one frame at
        # most): the close's Error has to follow whole frames.
        self._keep_half_sent_head()
        self._update_reading()
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())
        last_words = spb.Frame(error=spb.Error(code=8, message=reason))
        self.loop.call_soon(functools.partial(self.close, reason, last_words=last_words))

    def _keep_half_sent_head(self) -> None:
        """Drops every queued frame but the rest of one already partly sent."""
        head = self._out[0] if self._out and self._out[0].offset else None
        self._out.clear()
        self.queued_bytes = 0
        if head is not None:
            self._out.append(head)
            self.queued_bytes = head.pending

    def _flush(self) -> None:
        while self._out and not self.closed:
            chunk = self._out[0]
            try:
                sent = chunk.send(self.sock)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.close(f"send failed: {exc}")
                return
            self.queued_bytes -= sent
            if not chunk.pending:
                self._out.popleft()
                continue
            if not self._writing:
                self._writing = True
                self.loop.add_writer(self.sock.fileno(), self._on_writable)
            break
        else:
            if self._writing:
                self._writing = False
                self.loop.remove_writer(self.sock.fileno())
        if self.paused and self.queued_bytes < self.outbound_pause_bytes // 2:
            self.paused = False
            self._update_reading()
            self._schedule_dispatch()

    def _on_writable(self) -> None:
        self._flush()

    # -- closing -----------------------------------------------------------------------------

    def close(self, reason: str, last_words: spb.Frame | None = None) -> None:
        """Closes the connection: the pidfd and every fd not yet taken now, and the host is
        told once. Frames still queued are dropped (the session is over), but for the rest of
        one already partly sent.

        `last_words` (a Goodbye or an Error: why the session ends) go after that: a peer
        that is behind in reading (a long snapshot, a SIGSTOP) still finds them once it reads
        what is already in its socket, instead of a bare end of stream. Until they are
        delivered, for at most LINGER_S, the socket stays open for writing only."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        fileno = self.sock.fileno()
        if self._reading:
            self._reading = False
            self.loop.remove_reader(fileno)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(fileno)
        self._keep_half_sent_head()
        if last_words is not None:
            self._out.append(_Chunk(wire.encode(last_words), ()))
        lingering = bool(self._out) and self._linger()
        if not lingering:
            self._out.clear()
        self.queued_bytes = 0
        # Frames decoded but never handed on still own their fds.
        while self._ready:
            _close_fds(self._ready.popleft()[1])
        self._decoder.close()
        if not lingering:
            self.sock.close()
        os.close(self.pidfd)
        log.debug("session of pid %d closed: %s", self.cred.pid, reason)
        self.host.on_closed(self)

    def _linger(self) -> bool:
        """Sends what is left of `_out` (a closed connection's last words); True when some of
        it waits for the peer to read (the socket then closes when it is out, or after
        LINGER_S)."""
        if self._send_left():
            return False
        timer = self.loop.call_later(LINGER_S, self._end_linger)
        self.loop.add_writer(self.sock.fileno(), self._linger_step, timer)
        return True

    def _send_left(self) -> bool:
        """One round of sends; True when nothing is left to send or nothing more can be."""
        while self._out:
            try:
                self._out[0].send(self.sock)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True  # the peer is gone: nobody to tell
            if self._out[0].pending:
                return False
            self._out.popleft()
        return True

    def _linger_step(self, timer: asyncio.TimerHandle) -> None:
        if self._send_left():
            timer.cancel()
            self._end_linger()

    def _end_linger(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.loop.remove_writer(self.sock.fileno())
        self._out.clear()
        self.sock.close()


class Listener:
    """The listening session socket; hands each accepted connection to the host.

    Bound under a temporary name and renamed over `path` once listening (see `SocketFile`):
    a stale session.sock is replaced atomically, a live one makes the constructor raise
    StartupRefused without touching it. Or `adopted`: a listening socket systemd bound and
    passed (socket activation); its file is systemd's, never removed here.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        path: Path,
        mode: int,
        accept: SessionAcceptor,
        adopted: socket.socket | None = None,
    ) -> None:
        self.loop = loop
        self.path = path
        self._accept_cb = accept
        self.file: SocketFile | None = None
        if adopted is not None:
            # Shared with systemd (it polls it while we are not running): O_NONBLOCK is set
            # on the shared description, which systemd does not mind.
            self.sock = adopted
            self.sock.setblocking(False)
            sys_sock.pass_credentials(self.sock)  # see below
            loop.add_reader(self.sock.fileno(), self._on_accept)
            return
        check_socket_path(path)
        tmp = temporary_socket_path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        bound = False
        try:
            old = os.umask(0o777 & ~mode)
            try:
                self.sock.bind(str(tmp))
                bound = True
            finally:
                os.umask(old)
            os.chmod(tmp, mode)
            # SO_PASSCRED on the listening socket: accepted sockets inherit it, and bytes a
            # peer sends before its connection is accepted carry its credentials too, so every
            # frame says which process sent it (Connection refuses any other than the peer's).
            sys_sock.pass_credentials(self.sock)
            self.sock.listen(4096)  # the kernel caps it at net.core.somaxconn
            self.sock.setblocking(False)
            self.file = SocketFile.install(tmp, path)
        except OSError:
            self.sock.close()
            if bound:
                _unlink_quietly(tmp)
            raise
        loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        # A few per turn of the loop: a connection flood must not keep everyone else waiting.
        for _ in range(16):
            try:
                conn_sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            conn_sock.setblocking(False)
            self._accept_cb(conn_sock)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self.file is not None:
            self.file.unlink()


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection: what it reads, its peer writes, with back-pressure
    (a peer whose send buffer fills pauses our reading) and half-closes passed on."""

    def __init__(self, relay: Relay, start_paused: bool = False) -> None:
        self.relay = relay
        self.peer: _Pipe | None = None
        self.transport: asyncio.Transport | None = None
        # What arrived before the peer was connected (uvloop may deliver a first read before
        # pause_reading takes effect); written to the peer once it is.
        self.early: list[bytes] = []
        self._start_paused = start_paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = typing.cast(asyncio.Transport, transport)
        self.relay.transports.add(transport)
        if self._start_paused:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        peer = self.peer.transport if self.peer is not None else None
        if peer is not None and peer.can_write_eof():
            peer.write_eof()
            return True  # keep our side open for what the peer still has to say
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.relay.transports.discard(self.transport)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Relay:
    """Accepts on a listening socket (the control socket systemd passed) and relays each
    connection, byte for byte, to the Unix socket at `target` (the gRPC server's private one).

    Why: grpcio binds its own sockets and cannot adopt a listening fd (its server addresses are
    unix:, unix-abstract:, vsock: and IP; no fd: scheme), so the only way to serve gRPC on a
    socket systemd owns is to pass the bytes on. It costs a Unix-socket hop per control call;
    the session socket, which the SDK uses for calls by default, is adopted directly.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, target: Path) -> None:
        self.loop = loop
        self.sock = sock
        self.target = target
        self.transports: set[asyncio.BaseTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        for _ in range(16):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control socket: accept failed: %s", exc)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        # The client's side is read only once the server's is connected: nothing read is lost.
        client = _Pipe(self, start_paused=True)
        server = _Pipe(self)
        client.peer, server.peer = server, client
        try:
            await self.loop.connect_accepted_socket(lambda: client, conn)
            await self.loop.create_unix_connection(lambda: server, str(self.target))
        except (OSError, asyncio.CancelledError) as exc:
            log.warning("control socket: cannot relay a connection: %r", exc)
            if client.transport is not None:
                client.transport.close()
            else:
                conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        assert client.transport is not None and server.transport is not None
        if client.early:
            server.transport.write(b"".join(client.early))
            client.early.clear()
        if client.transport.is_closing():
            server.transport.close()
        else:
            client.transport.resume_reading()

    def stop_accepting(self) -> None:
        """Takes no new connection (they queue on systemd's socket for the next daemon); the
        relayed ones go on until `close`."""
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def close(self) -> None:
        """Stops accepting and drops the relayed connections (the listening socket itself is
        systemd's: only our fd of it is closed)."""
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        for transport in list(self.transports):
            transport.close()


# -- socket files ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SocketFile:
    """A socket file this process bound: its path and the (st_dev, st_ino) it had when bound.

    `unlink()` removes the path only while it still names that very file, so a daemon never
    deletes a socket it did not create (a successor's, or one put there by hand).
    """

    path: Path
    dev: int
    ino: int

    @classmethod
    def install(cls, tmp: Path, path: Path) -> SocketFile:
        """Moves our freshly bound, listening socket file `tmp` to `path`.

        rename() replaces a stale socket at `path` atomically: there is no moment without a
        socket there, and the file is never bound under its public name half set up. `path` is
        checked again first (a server answering there is never replaced).
        """
        check_socket_path(path)
        st = os.lstat(tmp)
        os.rename(tmp, path)
        return cls(path, st.st_dev, st.st_ino)

    def is_ours(self) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (self.dev, self.ino)

    def unlink(self) -> bool:
        """Removes the path if it still is our socket file; True if it did."""
        if not self.is_ours():
            if self.path.exists() or self.path.is_symlink():
                log.warning(
                    "%s is no longer the socket this daemon bound: left in place", self.path
                )
            return False
        _unlink_quietly(self.path)
        return True


def temporary_socket_path(path: Path) -> Path:
    """A name next to `path`, private to this process, to bind under before the rename.

    A leftover of a dead process of the same pid is removed (it can only be that: the name has
    our pid in it and this process has not bound it yet).
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}")
    _unlink_quietly(tmp)
    return tmp


def check_socket_path(path: Path) -> bool:
    """Whether `path` holds a stale socket (True: it may be replaced) or nothing (False).

    Raises StartupRefused when a server answers there (another membrokerd, or anything else
    listening), when it cannot be told, or when something other than a socket is in the way.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupRefused(
            f"{path} exists and is not a socket: not removing it (move it away and start again)"
        )
    probe = socket.socket(
        socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    )
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return True  # nobody listens: a socket file left behind by a process that died
    except FileNotFoundError:
        return False
    except BlockingIOError:
        pass  # EAGAIN: a listener whose backlog is full -- very much alive
    except OSError as exc:
        raise StartupRefused(
            f"cannot tell whether {path} is in use ({errno.errorcode.get(exc.errno or 0, exc)}: "
            f"{exc.strerror}): not replacing it"
        ) from exc
    finally:
        probe.close()
    raise StartupRefused(
        f"{path} is in use: a server answers there (another membrokerd?); not touching it"
    )


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class SessionAcceptor(Protocol):
    """Takes an accepted socket: identifies the peer, then keeps or refuses it."""

    def __call__(self, sock: socket.socket) -> None: ...


def _close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
