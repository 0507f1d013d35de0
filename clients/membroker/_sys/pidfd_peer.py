"""Where a pidfd's process lives, seen from here: its pid in our PID namespace, or none.

A Unix-socket peer in a PID namespace that is neither ours nor nested inside ours has no pid
here: SO_PEERCRED reports pid 0, and nothing under our /proc names it. SO_PEERPIDFD (Linux 6.5+)
still hands us a pidfd of that very process, and the kernel tells what that pidfd's process is
from our side (verified on Linux 6.18):

- ``/proc/self/fdinfo/<pidfd>`` has ``Pid:`` and ``NSpid:`` lines, relative to the PID
  namespace of the procfs instance that is read (our /proc): the pid (> 0) when the process is
  visible here, **0** when it runs in a namespace outside ours (``NSpid:`` is then just 0),
  **-1** once it has exited.
- ``ioctl(pidfd, PIDFD_GET_PID_NAMESPACE)`` (Linux 6.11+) opens that process's PID namespace
  (an nsfs fd; its link reads ``pid:[INODE]``) even across namespaces; ESRCH once it has exited.

Neither makes the process's /proc/PID/maps, pagemap or fd table readable from here: nothing
opens /proc entries of a namespace we cannot see from a pidfd. Its exit can be polled, but it
cannot be signalled: pidfd_send_signal refuses (EINVAL) a process whose PID namespace is not
ours or a descendant of ours.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PIDFD_GET_PID_NAMESPACE",
    "PidfdView",
    "own_pid_namespace",
    "parse_pidfd_fdinfo",
    "pidfd_pid_namespace",
    "pidfd_view",
]

# include/uapi/linux/pidfd.h: PIDFS_IOCTL_MAGIC 0xFF, PIDFD_GET_PID_NAMESPACE = _IO(0xFF, 5).
PIDFD_GET_PID_NAMESPACE: Final = (0xFF << 8) | 5


@dataclass(frozen=True)
class PidfdView:
    """What our /proc says about a pidfd's process.

    `pid`: its pid in our PID namespace (> 0), 0 when it is alive in a namespace outside ours,
    -1 once it has exited, None when the kernel printed no ``Pid:`` line (not a pidfd, or a
    kernel before 5.4). `nspid`: its pids from our namespace down to its own (``NSpid:``).
    `pid_namespace`: ``pid:[INODE]`` of its PID namespace, or None when the kernel would not say
    (exited, no PIDFD_GET_PID_NAMESPACE before 6.11, or not permitted).
    """

    pid: int | None
    nspid: tuple[int, ...] = ()
    pid_namespace: str | None = None


def parse_pidfd_fdinfo(text: str) -> tuple[int | None, tuple[int, ...]]:
    """(Pid, NSpid) from the text of /proc/self/fdinfo/<pidfd>; (None, ()) without them."""
    pid: int | None = None
    nspid: tuple[int, ...] = ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        try:
            if key == "Pid":
                pid = int(value.strip())
            elif key == "NSpid":
                nspid = tuple(int(v) for v in value.split())
        except ValueError:
            continue
    return pid, nspid


def own_pid_namespace() -> str | None:
    """``pid:[INODE]`` of our own PID namespace, or None if /proc cannot say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pidfd_pid_namespace(pidfd: int) -> str | None:
    """``pid:[INODE]`` of the PID namespace of the process behind `pidfd` (borrowed), or None.

    None when the process has exited (ESRCH), the kernel lacks the ioctl (before 6.11: ENOTTY or
    EINVAL), or it is not permitted (EPERM, EACCES).
    """
    try:
        nsfd = fcntl.ioctl(pidfd, PIDFD_GET_PID_NAMESPACE)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOTTY, errno.EINVAL, errno.EPERM, errno.EACCES):
            return None
        raise
    try:
        return os.readlink(f"/proc/self/fd/{nsfd}")
    except OSError:
        return None
    finally:
        os.close(nsfd)


def pidfd_view(pidfd: int) -> PidfdView:
    """Our view of the process behind `pidfd` (borrowed): its pid here, and its PID namespace.

    OSError if `pidfd` is not open (EBADF, or ENOENT for its fdinfo). The namespace is asked
    first and the pid second, so that a process seen alive (pid >= 0) had its namespace read
    while it was alive too.
    """
    namespace = pidfd_pid_namespace(pidfd)
    with open(f"/proc/self/fdinfo/{pidfd}", encoding="ascii", errors="replace") as f:
        pid, nspid = parse_pidfd_fdinfo(f.read())
    return PidfdView(pid, nspid, namespace)
