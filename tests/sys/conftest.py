"""Fixtures for the real-syscall tests of membroker._sys: forked children, fd-leak checks, KVM,
huge pages reserved for the test (and given back)."""

from __future__ import annotations

import faulthandler
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from membroker._sys import (
    GuestMemfdFactory,
    guest_memfd_support,
    hugetlb_free_pages,
    open_fd_count,
)

HUGE_2M = 2 << 20


def run_in_child(body: Callable[[], object]) -> int:
    """Run `body` in a forked child; return its exit code as subprocess does (-SIG if killed).

    The child exits 0 if `body` returns, 1 if it raises. It dumps no core and has no Python
    fault handler, so a SIGSEGV/SIGBUS kills it with exactly that signal.
    """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            faulthandler.disable()
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            for sig in (signal.SIGSEGV, signal.SIGBUS):
                signal.signal(sig, signal.SIG_DFL)
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def child() -> Callable[[Callable[[], object]], int]:
    """run_in_child, as a fixture (test modules do not import conftest)."""
    return run_in_child


@pytest.fixture(autouse=True)
def no_fd_leak() -> Iterator[None]:
    """Every sys test must leave this process's fd table as it found it."""
    before = open_fd_count(os.getpid())
    yield
    after = open_fd_count(os.getpid())
    assert after == before, f"fd leak: {before} open before the test, {after} after"


@pytest.fixture(scope="session")
def guest_memfd_ok() -> None:
    supported, reason = guest_memfd_support()
    if not supported:
        pytest.skip(reason)


@pytest.fixture
def gmem_factory(guest_memfd_ok: None) -> Iterator[GuestMemfdFactory]:
    with GuestMemfdFactory() as factory:
        yield factory


def _nr_hugepages_path_2m() -> Path:
    """/proc/sys/vm/nr_hugepages when the default huge page size is 2 MiB (it is on x86_64 and
    4 KiB-page aarch64), else the 2 MiB pool's own sysfs file."""
    with open("/proc/meminfo") as f:
        default_kb = next(
            (int(line.split()[1]) for line in f if line.startswith("Hugepagesize:")), 0
        )
    if default_kb == HUGE_2M // 1024:
        return Path("/proc/sys/vm/nr_hugepages")
    return Path(f"/sys/kernel/mm/hugepages/hugepages-{HUGE_2M // 1024}kB/nr_hugepages")


@pytest.fixture
def huge_pages_2m() -> Iterator[Callable[[int], None]]:
    """reserve(n): makes at least n 2 MiB huge pages free for this test, by raising the
    pool (root only: writes nr_hugepages); what was added is given back afterwards, even when
    the test fails.

    The pool is system-wide and other processes may resize it meanwhile, so the teardown
    subtracts what this test added from the pool's size at that moment rather than writing
    back the old count.
    """
    path = _nr_hugepages_path_2m()
    added = 0

    def reserve(count: int) -> None:
        nonlocal added
        free = hugetlb_free_pages(HUGE_2M)
        if free >= count:
            return
        if not path.exists():
            pytest.skip("kernel has no 2 MiB hugetlb pool")
        if os.geteuid() != 0:
            pytest.skip(f"needs {count} free 2 MiB huge pages ({free} free) and root to reserve")
        old = int(path.read_text())
        want = old + (count - free)
        path.write_text(f"{want}\n")
        # The kernel allocates what it can at once and reports the count it reached.
        added += max(0, int(path.read_text()) - old)
        free = hugetlb_free_pages(HUGE_2M)
        if free < count:
            pytest.fail(
                f"reserved {added} 2 MiB huge pages but only {free} are free (need {count})"
            )

    yield reserve
    if added:
        now = int(path.read_text())
        path.write_text(f"{max(0, now - added)}\n")
