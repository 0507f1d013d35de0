"""Fixtures for the deployment tests (helpers live in deploy_helpers.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import Daemon, UserManager, skip_unless_manager_possible


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One plain daemon shared by a module's scrape tests; stopped with SIGTERM at the end."""
    d = Daemon(tmp_path_factory.mktemp("deploy") / "rt")
    yield d
    rc = d.stop()
    assert rc == 0, d.log()


@pytest.fixture(scope="module")
def manager() -> Iterator[UserManager]:
    """A real `systemd --user` manager with the shipped units, one per test module."""
    skip_unless_manager_possible()
    # Short: socket paths must fit in sun_path (108 bytes).
    base = Path(tempfile.mkdtemp(prefix="mbsd-"))
    os.chmod(base, 0o755)
    m = UserManager(base)
    try:
        m.install_units()
        m.start()
        yield m
    finally:
        m.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def sd(manager: UserManager) -> Iterator[UserManager]:
    """The module's manager, with the membrokerd units reset before and after the test."""
    manager.reset()
    try:
        yield manager
    finally:
        manager.reset()
