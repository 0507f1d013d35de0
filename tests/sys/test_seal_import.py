"""Importing an owner's memfd: the size seen before sealing is checked again after, for real."""

from __future__ import annotations

import os
import threading

import pytest

from membroker._sys import (
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    PAGE_SIZE,
    get_seals,
)
from membrokerd.errors import BadRequest
from membrokerd.spaces import inspect_import, seal_import

SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL


def _owner_memfd(size: int) -> int:
    """A memfd as an owner would make one to import: sealable, not sealed."""
    fd = os.memfd_create("owner", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def test_seal_import_seals_an_unchanged_memfd() -> None:
    fd = _owner_memfd(8 * PAGE_SIZE)
    try:
        found = inspect_import(fd)
        assert (found.size, found.needs_seals) == (8 * PAGE_SIZE, True)
        seal_import(fd, found.size)
        assert get_seals(fd) & SEALS == SEALS
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PAGE_SIZE)
    finally:
        os.close(fd)


@pytest.mark.parametrize("new_size", [2 * PAGE_SIZE, 16 * PAGE_SIZE], ids=["shrunk", "grown"])
def test_seal_import_refuses_a_memfd_resized_after_inspection(new_size: int) -> None:
    # The race of item 12: the owner (or anyone holding the memfd) truncates it between the
    # broker's inspection and its sealing. Here the resize is forced into that window.
    fd = _owner_memfd(8 * PAGE_SIZE)
    holder = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)  # another holder
    try:
        found = inspect_import(fd)
        os.ftruncate(holder, new_size)
        with pytest.raises(BadRequest) as exc:
            seal_import(fd, found.size)
        assert str(exc.value).startswith(
            f"imported memfd changed size from {8 * PAGE_SIZE} to {new_size} while being sealed"
        )
        # The seals are on (they belong to the inode): the size can no longer move either way.
        assert get_seals(holder) & SEALS == SEALS
        with pytest.raises(PermissionError):
            os.ftruncate(holder, 8 * PAGE_SIZE)
    finally:
        os.close(holder)
        os.close(fd)


def test_seal_import_under_a_concurrent_resizer() -> None:
    # A thread truncating as fast as it can while the broker seals: whichever size the memfd
    # has once sealed, seal_import either agrees with inspect_import or says it changed --
    # never a sealed memfd of another size than the one it reports.
    outcomes: set[str] = set()
    for _ in range(50):
        fd = _owner_memfd(4 * PAGE_SIZE)
        stop = threading.Event()

        def resize(fd: int = fd, stop: threading.Event = stop) -> None:
            size = 4 * PAGE_SIZE
            while not stop.is_set():
                size = 4 * PAGE_SIZE if size != 4 * PAGE_SIZE else 6 * PAGE_SIZE
                try:
                    os.ftruncate(fd, size)
                except PermissionError:
                    return  # sealed

        worker = threading.Thread(target=resize)
        try:
            found = inspect_import(fd)
            worker.start()
            try:
                seal_import(fd, found.size)
                outcomes.add("same")
                assert os.fstat(fd).st_size == found.size
            except BadRequest as exc:
                outcomes.add("changed")
                assert "changed size" in str(exc)
                assert os.fstat(fd).st_size != found.size
        finally:
            stop.set()
            if worker.ident is not None:
                worker.join()
            os.close(fd)
    assert outcomes
