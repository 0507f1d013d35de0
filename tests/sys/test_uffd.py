"""The kernel facts sealed VA mode stands on (membrokerd.faults), checked against this kernel:
userfaultfd registration, partial CONTINUE, POISON beside write-protect markers, mseal, and the
one gap the README's threat model names (a second uffd of the same process can CONTINUE)."""

from __future__ import annotations

import errno
import os

import pytest

from membroker._sys import mman
from membroker._sys import uffd as sys_uffd
from membroker._sys.memfd import create_memfd
from membroker._sys.proc import ProcessView
from membroker.clients import sealed_mode_available

PAGE = 4096

pytestmark = pytest.mark.skipif(
    not sealed_mode_available(), reason="the kernel lacks mseal or userfaultfd on shmem"
)


def _space(pages: int, written: range) -> int:
    fd = create_memfd("uffd-test", pages * PAGE)
    for p in written:
        os.pwrite(fd, bytes([p + 1]) * PAGE, p * PAGE)
    return fd


def test_registration_after_seal_and_partial_continue() -> None:
    fd = _space(8, range(0, 3))  # pages 0-2 written, 3-7 holes
    m = mman.Mapping.map_shared(fd, 8 * PAGE, mman.PROT_READ | mman.PROT_WRITE)
    u = sys_uffd.Uffd.create()
    try:
        m.seal()
        flags = sys_uffd.vma_flags(os.getpid(), m.address)
        assert {"sl", "dc"} <= flags
        u.register(m.address, 8 * PAGE, sys_uffd.MODE_MISSING | sys_uffd.MODE_MINOR)
        assert {"um", "ui"} <= sys_uffd.vma_flags(os.getpid(), m.address)
        # Another uffd of this process cannot take the range over.
        other = sys_uffd.Uffd.create()
        with pytest.raises(OSError) as busy:
            other.register(m.address, 8 * PAGE, sys_uffd.MODE_MINOR)
        assert busy.value.errno == errno.EBUSY
        # CONTINUE maps pages in the page cache and stops at the first hole, saying how far.
        assert u.continue_(m.address, 8 * PAGE) == 3 * PAGE
        view = ProcessView(os.getpid())
        try:
            present = list(view.present_regions(m.address, 8))
        finally:
            view.close()
        assert present == [(m.address, m.address + 3 * PAGE)]
        # ...and refuses a window whose first page is present.
        with pytest.raises(OSError) as exists:
            u.continue_(m.address, PAGE)
        assert exists.value.errno == errno.EEXIST
        # The gap the threat model names: the *other* uffd maps a page of this range too.
        os.pwrite(fd, b"x" * PAGE, 5 * PAGE)
        assert other.continue_(m.address + 5 * PAGE, PAGE) == PAGE
        other.close()
        # Sealed: no mprotect, no munmap.
        with pytest.raises(PermissionError):
            m.protect(0, PAGE, mman.PROT_NONE)
    finally:
        u.close()
        m.close()
        os.close(fd)


def test_a_read_only_description_cannot_be_registered() -> None:
    fd = _space(2, range(0, 2))
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    m = mman.Mapping.map_shared(ro, 2 * PAGE, mman.PROT_READ)
    u = sys_uffd.Uffd.create()
    try:
        with pytest.raises(OSError) as refused:
            u.register(m.address, 2 * PAGE, sys_uffd.MODE_MINOR)
        assert refused.value.errno == errno.EPERM
    finally:
        u.close()
        m.close()
        os.close(ro)
        os.close(fd)


def test_poison_is_refused_where_a_write_protect_marker_sits() -> None:
    fd = _space(4, range(0))
    m = mman.Mapping.map_shared(fd, 4 * PAGE, mman.PROT_READ | mman.PROT_WRITE)
    u = sys_uffd.Uffd.create()
    try:
        mode = sys_uffd.MODE_MISSING | sys_uffd.MODE_MINOR | sys_uffd.MODE_WP
        u.register(m.address, 4 * PAGE, mode)
        assert u.poison(m.address, PAGE) == PAGE
        u.writeprotect(m.address + PAGE, 3 * PAGE)
        with pytest.raises(OSError) as marker:
            u.poison(m.address + PAGE, PAGE)
        assert marker.value.errno == errno.EEXIST
    finally:
        u.close()
        m.close()
        os.close(fd)


def test_write_protected_pages_are_not_written_in_pagemap_scan() -> None:
    fd = _space(4, range(0, 4))
    m = mman.Mapping.map_shared(fd, 4 * PAGE, mman.PROT_READ | mman.PROT_WRITE)
    u = sys_uffd.Uffd.create()
    view = ProcessView(os.getpid())
    try:
        mode = sys_uffd.MODE_MISSING | sys_uffd.MODE_MINOR | sys_uffd.MODE_WP
        u.register(m.address, 4 * PAGE, mode)
        assert u.continue_(m.address, 2 * PAGE) == 2 * PAGE  # writable
        assert u.continue_(m.address + 2 * PAGE, 2 * PAGE, wp=True) == 2 * PAGE
        assert list(view.writable_regions(m.address, 4)) == [(m.address, m.address + 2 * PAGE)]
        u.writeprotect(m.address, 4 * PAGE)
        assert list(view.writable_regions(m.address, 4)) == []
        assert list(view.present_regions(m.address, 4)) == [(m.address, m.address + 4 * PAGE)]
    finally:
        view.close()
        u.close()
        m.close()
        os.close(fd)


def test_a_process_without_cap_sys_ptrace_is_not_offered_sealed_mode() -> None:
    """Fork events need CAP_SYS_PTRACE: a process without it (a container's, say) must not be
    told sealed mode is available, or attach_va(mode="auto") would fail instead of falling
    back to cooperative mode."""
    import subprocess
    import sys

    probe = (
        "from membroker.clients import sealed_mode_available\n"
        "from membroker._sys import uffd\n"
        "print(sealed_mode_available())\n"
        "try:\n"
        "    uffd.Uffd.create(uffd.FEATURES_SEALED)\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno)\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set=-sys_ptrace", sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    assert out[0] == "False"
    assert out[1] == f"KernelFeatureMissing {errno.EPERM}"
