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

import pytest

from membroker._sys import (
    GuestMemfdFactory,
    guest_memfd_support,
    open_fd_count,
)


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
