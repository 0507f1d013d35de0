"""Unix-socket fd passing (SCM_RIGHTS), peer identity (SO_PEERCRED, SO_PEERGROUPS, pidfds)."""

from __future__ import annotations

import array
import ctypes
import errno
import os
import select
import signal
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from .libc import KernelFeatureMissing, check, libc

__all__ = [
    "MAX_FDS_PER_FRAME",
    "SCM_MAX_FD",
    "SO_PEERGROUPS",
    "SO_PEERPIDFD",
    "PeerCred",
    "UCred",
    "adopt_unix_stream",
    "pass_credentials",
    "peer_credentials",
    "peer_groups",
    "peer_pidfd",
    "peer_uid",
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
SO_PEERGROUPS: Final = 59
SO_PEERPIDFD: Final = 77

# First guess of a peer's supplementary group count; the kernel says how many when it is more.
_GROUPS_GUESS: Final = 64
# NGROUPS_MAX (include/uapi/linux/limits.h): no process has more supplementary groups.
_NGROUPS_MAX: Final = 65536
_GID_SIZE: Final = ctypes.sizeof(ctypes.c_uint32)

# int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen);
# A prototype of our own (not libc.getsockopt, whose argtypes are shared by the whole process).
# Python's socket.getsockopt caps buflen at 1024 bytes (256 gids) and hides the length the kernel
# reports with ERANGE, so the group list is read through libc directly.
_getsockopt = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
    use_errno=True,
)(("getsockopt", libc))

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
    """Who was at the other end of a Unix socket when it was connected (or socketpair'ed).

    `groups` is the peer's supplementary groups as the kernel captured them at connect time
    (SO_PEERGROUPS), always with `gid` added: every group whose members a policy may admit.
    """

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.gid not in self.groups:
            # A frozen dataclass: object.__setattr__ is the documented way to finish one.
            object.__setattr__(self, "groups", frozenset(self.groups) | {self.gid})


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
    data, fds, truncated, _ = _recv(sock, bufsize, maxfds, False)
    return data, fds, truncated


def recv_with_fds_and_sender(
    sock: socket.socket, bufsize: int, maxfds: int = MAX_FDS_PER_FRAME
) -> tuple[bytes, list[int], bool, int | None]:
    """`recv_with_fds`, and the pid of the process that sent these bytes (SCM_CREDENTIALS, as
    the kernel recorded it at send time: a sender cannot name another process unless it has
    CAP_SYS_ADMIN), or None when the message carried none. Needs SO_PASSCRED on `sock`
    (`pass_credentials`); with it one recvmsg never returns the bytes of two senders."""
    return _recv(sock, bufsize, maxfds, True)


def pass_credentials(sock: socket.socket) -> None:
    """SO_PASSCRED: every message received on `sock` says which process sent it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)


_CRED_SPACE: Final = socket.CMSG_SPACE(ctypes.sizeof(UCred))
# Plain ints: socket's MSG_* are enum flags, and `flags & socket.MSG_CTRUNC` goes through
# enum's __and__ (~0.5 us) on every receive.
_MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC: Final = int(socket.MSG_CMSG_CLOEXEC)
_UCRED_PID: Final = struct.Struct("=i")  # UCred.pid, at offset 0


def _recv(
    sock: socket.socket, bufsize: int, maxfds: int, creds: bool
) -> tuple[bytes, list[int], bool, int | None]:
    if maxfds < 0 or maxfds > SCM_MAX_FD:
        raise ValueError(f"maxfds {maxfds} is outside 0..{SCM_MAX_FD}")
    # CMSG_LEN, not CMSG_SPACE: the kernel installs (controllen - header) / sizeof(int) fds, and
    # CMSG_SPACE rounds up to 8 bytes, so an odd maxfds would silently admit one extra fd. The
    # kernel puts SCM_CREDENTIALS first, so its room goes in front of the fds' room.
    ancbufsize = socket.CMSG_LEN(maxfds * _INT_SIZE) if maxfds else 0
    if creds:
        ancbufsize += _CRED_SPACE
    # MSG_CMSG_CLOEXEC: the fds are installed close-on-exec atomically, so a fork+exec in
    # another thread cannot inherit them. A Unix stream socket never returns the bytes of two
    # sendmsg calls in one recvmsg when the second carried fds, so fds arrive with the first
    # byte of the message that sent them.
    data, ancdata, flags, _ = sock.recvmsg(bufsize, ancbufsize, _MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    sender: int | None = None
    for level, kind, payload in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_RIGHTS:
            whole = len(payload) - len(payload) % _INT_SIZE
            fds.extend(array.array("i", payload[:whole]))
        elif kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED_PID.size:
            # Every message's: the pid field alone, without a ctypes object each time.
            (sender,) = _UCRED_PID.unpack_from(payload)
    truncated = bool(flags & _MSG_CTRUNC) or len(fds) > maxfds
    return data, fds, truncated, sender


def adopt_unix_stream(fd: int) -> socket.socket:
    """A socket object owning `fd`, which must be a Unix stream socket; else ValueError (and
    `fd` is still the caller's). Its family and type are the kernel's (SO_DOMAIN, SO_TYPE)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"fd is not a socket ({exc.strerror})") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        what = f"{sock.family.name} {sock.type.name}"
        sock.detach()  # the fd stays the caller's
        raise ValueError(f"fd is a {what} socket, not a Unix stream socket")
    return sock


def peer_credentials(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED and SO_PEERGROUPS: the pid, uid, gid and supplementary groups of the peer,
    all captured by the kernel at connect() (a later setgroups() of the peer changes nothing)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, ctypes.sizeof(UCred))
    cred = UCred.from_buffer_copy(raw)
    return PeerCred(pid=cred.pid, uid=cred.uid, gid=cred.gid, groups=peer_groups(sock))


def peer_uid(sock: socket.socket) -> int:
    """SO_PEERCRED's uid alone: what deciding whether to refuse a connection needs (cheaper
    than `peer_credentials`, which also reads the groups)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, ctypes.sizeof(UCred))
    return int(UCred.from_buffer_copy(raw).uid)


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """SO_PEERGROUPS (Linux 4.13+): the peer's supplementary gids at connect(), in our user ns.

    Without the option (ENOPROTOOPT) the answer is empty: a policy then sees only the gid, so
    it admits less, never more.
    """
    count = _GROUPS_GUESS
    for _ in range(3):
        buf = (ctypes.c_uint32 * count)()
        optlen = ctypes.c_uint32(count * _GID_SIZE)
        # SAFETY: buf is a live array of `count` gid_t and optlen holds its size in bytes, so
        # the kernel writes at most that much; sock.fileno() is open for the whole call.
        ret = _getsockopt(
            sock.fileno(),
            socket.SOL_SOCKET,
            SO_PEERGROUPS,
            ctypes.cast(buf, ctypes.c_void_p),
            ctypes.byref(optlen),
        )
        if ret == 0:
            return frozenset(buf[: optlen.value // _GID_SIZE])
        err = ctypes.get_errno()
        if err == errno.ENOPROTOOPT:
            return frozenset()
        if err != errno.ERANGE:
            check(ret, "getsockopt(SO_PEERGROUPS)")
        # Kernel fact: with ERANGE it stores the size it needs in optlen. The groups were
        # captured at connect() and cannot change, so the second try fits; the loop is a guard.
        needed = optlen.value // _GID_SIZE
        count = min(max(needed, count * 2), _NGROUPS_MAX)
    raise OSError(errno.ERANGE, "getsockopt(SO_PEERGROUPS): group list kept growing")


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
