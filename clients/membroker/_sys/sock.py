"""Unix-socket fd passing (SCM_RIGHTS), peer identity (SO_PEERCRED, pidfds) for session sockets."""

from __future__ import annotations

import array
import ctypes
import errno
import os
import select
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .libc import KernelFeatureMissing

__all__ = [
    "MAX_FDS_PER_FRAME",
    "SCM_MAX_FD",
    "SO_PEERPIDFD",
    "PeerCred",
    "UCred",
    "peer_credentials",
    "peer_pidfd",
    "pidfd_is_alive",
    "pidfd_open",
    "pidfd_send_signal",
    "recv_with_fds",
    "send_with_fds",
]

# The session protocol's limit; the kernel's own per-message limit is SCM_MAX_FD.
MAX_FDS_PER_FRAME: Final = 4
SCM_MAX_FD: Final = 253

# include/uapi/asm-generic/socket.h (x86_64 and aarch64; alpha/mips/parisc/sparc differ).
SO_PEERPIDFD: Final = 77

_INT_SIZE: Final = array.array("i").itemsize


class UCred(ctypes.Structure):
    """`struct ucred` as SO_PEERCRED returns it (12 bytes).

    offset  size  field
         0     4  pid   (pid_t, signed)
         4     4  uid   (uid_t)
         8     4  gid   (gid_t)
    """

    _fields_ = [("pid", ctypes.c_int32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32)]


assert ctypes.sizeof(UCred) == 12


@dataclass(frozen=True)
class PeerCred:
    """Who was at the other end of a Unix socket when it was connected (or socketpair'ed)."""

    pid: int
    uid: int
    gid: int


def send_with_fds(
    sock: socket.socket, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()
) -> int:
    """One sendmsg of `data` carrying `fds` (borrowed) as SCM_RIGHTS; returns the bytes sent.

    On a stream socket the fds travel with the first byte of this call: if fewer than len(data)
    bytes were sent, the fds are already on their way and the caller sends the rest of the data
    WITHOUT them. If the call raises (BlockingIOError included), nothing was sent, fds neither.
    """
    if fds:
        if not data:
            # Gotcha: a zero-length sendmsg on a SOCK_STREAM Unix socket queues nothing, so its
            # SCM_RIGHTS would be silently dropped.
            raise ValueError("file descriptors need at least one byte of data to travel with")
        if len(fds) > SCM_MAX_FD:
            raise ValueError(f"{len(fds)} fds in one message; the kernel allows {SCM_MAX_FD}")
        if any(fd < 0 for fd in fds):
            raise ValueError(f"negative fd in {list(fds)!r}")
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    else:
        ancdata = []
    # MSG_NOSIGNAL: a peer that went away is EPIPE here, never a process-wide SIGPIPE.
    return sock.sendmsg([data], ancdata, socket.MSG_NOSIGNAL)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_with_fds(
    sock: socket.socket, bufsize: int, maxfds: int = MAX_FDS_PER_FRAME
) -> tuple[bytes, list[int], bool]:
    """One recvmsg: (data, fds now owned by the caller, truncated).

    `truncated` is True when the kernel had more fds than `maxfds` for us (MSG_CTRUNC): the
    ones that did not fit were never installed here (the kernel drops them), the ones that did
    are returned so the caller closes them. b"" with no fds means end of stream.
    """
    if maxfds < 0 or maxfds > SCM_MAX_FD:
        raise ValueError(f"maxfds {maxfds} is outside 0..{SCM_MAX_FD}")
    # CMSG_LEN, not CMSG_SPACE: the kernel installs (controllen - header) / sizeof(int) fds, and
    # CMSG_SPACE rounds up to 8 bytes, so an odd maxfds would silently admit one extra fd.
    ancbufsize = socket.CMSG_LEN(maxfds * _INT_SIZE) if maxfds else 0
    # MSG_CMSG_CLOEXEC: the fds are installed close-on-exec atomically, so a fork+exec in
    # another thread cannot inherit them. A Unix stream socket never returns the bytes of two
    # sendmsg calls in one recvmsg when the second carried fds, so fds arrive with the first
    # byte of the message that sent them.
    data, ancdata, flags, _ = sock.recvmsg(bufsize, ancbufsize, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % _INT_SIZE
            fds.extend(array.array("i", payload[:whole]))
    truncated = bool(flags & socket.MSG_CTRUNC) or len(fds) > maxfds
    return data, fds, truncated


def peer_credentials(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED: the pid, uid and gid of the peer, captured by the kernel at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, ctypes.sizeof(UCred))
    cred = UCred.from_buffer_copy(raw)
    return PeerCred(pid=cred.pid, uid=cred.uid, gid=cred.gid)


def peer_pidfd(sock: socket.socket) -> int:
    """A pidfd (owned, close-on-exec) of the peer process.

    SO_PEERPIDFD (Linux 6.5+) names the very process that connected, even if it has exited and
    its pid was reused since. On older kernels this falls back to pidfd_open(SO_PEERCRED pid),
    which can race with pid reuse if the peer already died.
    """
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            raise
    return pidfd_open(peer_credentials(sock).pid)


def pidfd_open(pid: int) -> int:
    """A pidfd (owned; pidfds are always close-on-exec) for `pid`. ESRCH if it does not exist."""
    try:
        return os.pidfd_open(pid)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise KernelFeatureMissing("pidfd_open", "needs Linux 5.3", e.errno) from e
        raise


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    """Send `sig` to the process behind `pidfd` -- never to a recycled pid. ESRCH once reaped."""
    signal.pidfd_send_signal(pidfd, sig)


def pidfd_is_alive(pidfd: int) -> bool:
    """False once the process behind `pidfd` has exited (its pidfd polls readable)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    events = poller.poll(0)
    if not events:
        return True
    (_, revents), *_ = events
    if revents & select.POLLNVAL:
        raise OSError(errno.EBADF, f"pidfd_is_alive: {pidfd} is not an open fd")
    return False
