"""Configuration: defaults, TOML, environment, and clear messages for bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from membrokerd.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_flags_over_env_over_file(tmp_path, monkeypatch):
    f = tmp_path / "b.toml"
    f.write_text('revoke_deadline_ms = 100\nmax_spaces = 3\ncontrol_socket_mode = "0600"\n')
    monkeypatch.setenv("MEMBROKER_REVOKE_DEADLINE_MS", "200")
    cfg = load_config(f)
    assert (cfg.revoke_deadline_ms, cfg.max_spaces, cfg.control_socket_mode) == (200, 3, 0o600)
    cfg = load_config(f, revoke_deadline_ms=300, runtime_dir=tmp_path)
    assert cfg.revoke_deadline_ms == 300
    assert cfg.session_socket == tmp_path / "session.sock"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("revoke_deadline_ms = 0", "revoke_deadline_ms"),
        ('metrics_address = "nowhere"', "is not host:port"),
        ('control_socket_mode = "rw"', "not an octal number"),
        ('log_level = "LOUD"', "is not one of"),
        ("no_such_setting = 1", "no_such_setting"),
        ("revoke_deadline_ms = ", "cannot read configuration"),
    ],
)
def test_bad_values_are_named(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(f)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_daemon_exits_2_with_the_message(tmp_path):
    env = {
        "PYTHONPATH": f"{ROOT / 'clients'}:{ROOT / 'broker'}",
        "MEMBROKER_MAX_SPACES": "many",
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "membrokerd", "--runtime-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "max_spaces" in proc.stderr and "$MEMBROKER_MAX_SPACES" in proc.stderr
