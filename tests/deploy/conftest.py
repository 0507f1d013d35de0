"""Fixtures for the deployment tests (helpers live in deploy_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from deploy_helpers import Daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One plain daemon shared by a module's scrape tests; stopped with SIGTERM at the end."""
    d = Daemon(tmp_path_factory.mktemp("deploy") / "rt")
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
