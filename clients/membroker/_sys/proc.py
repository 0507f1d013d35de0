"""Per-process fd tables from /proc, for leak checks and for verifying what a client holds."""

from __future__ import annotations

import os

__all__ = ["fd_targets", "open_fd_count"]


def _fd_numbers(pid: int) -> list[int]:
    """The open fd numbers of `pid`, without the directory fd this function itself opens."""
    dir_fd = os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = os.listdir(dir_fd)
    finally:
        os.close(dir_fd)
    fds = sorted(int(name) for name in names)
    if pid == os.getpid():
        # Listing our own fd table shows the directory fd we held while listing it.
        fds.remove(dir_fd)
    return fds


def open_fd_count(pid: int) -> int:
    """How many fds process `pid` has open right now."""
    return len(_fd_numbers(pid))


def fd_targets(pid: int) -> list[str]:
    """readlink of each open fd of `pid`, by fd number ("pipe:[123]", "/memfd:x (deleted)", ...).

    Fds closed while we look are skipped.
    """
    targets = []
    for fd in _fd_numbers(pid):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            continue
    return targets
