"""The example configuration and the container file."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, EXAMPLE_CONFIG, ROOT

from membrokerd.config import BrokerConfig, load_config


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("MEMBROKER_")]:
        monkeypatch.delenv(var)


def test_example_config_loads(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    config = load_config(Path("deploy/membrokerd.toml"))
    assert config.runtime_dir == Path("/run/membroker")


def test_example_config_lists_every_setting_with_its_default(clean_env: None) -> None:
    """A new setting must be documented here; a changed default must be updated here."""
    in_file = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert set(in_file) == set(BrokerConfig.model_fields)
    loaded = load_config(EXAMPLE_CONFIG)
    defaults = BrokerConfig()
    for name in BrokerConfig.model_fields:
        # These defaults depend on the uid (and state_dir's on runtime_dir): the file shows
        # root's.
        if name not in ("runtime_dir", "state_dir"):
            assert getattr(loaded, name) == getattr(defaults, name), name
    assert (
        loaded.journal_dir
        == defaults.model_copy(update={"runtime_dir": loaded.runtime_dir}).journal_dir
    )


def test_example_config_comments_every_setting() -> None:
    """Every key is preceded by a comment line explaining it (directly or in its group)."""
    lines = EXAMPLE_CONFIG.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+\s*=", line):
            j = i - 1
            while j >= 0 and re.match(r"^[a-z_]+\s*=", lines[j]):
                j -= 1
            assert j >= 0 and lines[j].startswith("#"), f"no comment above {line!r}"


KNOWN_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "RUN",
    "COPY",
    "ADD",
    "ENV",
    "VOLUME",
    "EXPOSE",
    "STOPSIGNAL",
    "ENTRYPOINT",
    "CMD",
    "USER",
    "WORKDIR",
    "LABEL",
    "HEALTHCHECK",
    "SHELL",
    "ONBUILD",
}


def test_containerfile_is_sane() -> None:
    """Without podman or a local base image here, check what can be checked offline."""
    text = (DEPLOY / "Containerfile").read_text()
    logical, current = [], ""
    for raw in text.splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    assert not current, "dangling line continuation"
    words = [line.split(None, 1) for line in logical]
    assert all(w[0] in KNOWN_INSTRUCTIONS for w in words), [w[0] for w in words]
    assert [w[0] for w in words].index("FROM") <= 1  # only ARG may precede FROM
    entry = json.loads(next(w[1] for w in words if w[0] == "ENTRYPOINT"))
    assert entry[1:] == ["--config", "/etc/membroker/membrokerd.toml"]
    for w in words:
        if w[0] == "COPY" and w[1].startswith("deploy/"):
            assert (ROOT / w[1].split()[0]).exists(), w[1]
    assert "localhost/" in text, "base images must be local: no registry is reachable"
