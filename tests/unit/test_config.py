"""Configuration: defaults, TOML, environment, and clear messages for bad values."""

from __future__ import annotations

import os
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


def test_hardening_defaults(monkeypatch):
    for var in [v for v in os.environ if v.startswith("MEMBROKER_")]:
        monkeypatch.delenv(var)
    cfg = load_config()
    assert (cfg.hello_timeout_s, cfg.max_pending_hellos_per_uid) == (2.0, 16)
    assert (cfg.max_outbound_bytes, cfg.outbound_pause_bytes) == (64 << 20, 256 << 10)
    assert (cfg.on_unverifiable, cfg.on_fenced_still_mapped) == ("fence", "kill")
    assert (cfg.fence_grace_ms, cfg.attach_without_grant, cfg.client_name_binding) == (
        200,
        False,
        "uid",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hello_timeout_s = 0.05", "hello_timeout_s.*greater than or equal to 0.1"),
        ("hello_timeout_s = 61", "hello_timeout_s.*less than or equal to 60"),
        ("max_pending_hellos_per_uid = 0", "max_pending_hellos_per_uid"),
        ("max_outbound_bytes = 65535", "max_outbound_bytes.*greater than or equal to 65536"),
        ("fence_grace_ms = -1", "fence_grace_ms"),
        ("fence_grace_ms = 10001", "fence_grace_ms"),
        ('on_unverifiable = "ignore"', "on_unverifiable.*'fence' or 'report'"),
        ('on_fenced_still_mapped = "disconnect"', "on_fenced_still_mapped.*'kill' or 'report'"),
        ('client_name_binding = "gid"', "client_name_binding.*'uid' or 'none'"),
        ('attach_without_grant = "perhaps"', "attach_without_grant"),
        (
            "max_outbound_bytes = 1048576\noutbound_pause_bytes = 1048576",
            r"outbound_pause_bytes \(1048576\) must be less than max_outbound_bytes \(1048576\)",
        ),
    ],
)
def test_bad_hardening_values_are_named(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(f)


def test_hardening_values_from_env(monkeypatch):
    monkeypatch.setenv("MEMBROKER_HELLO_TIMEOUT_S", "0.5")
    monkeypatch.setenv("MEMBROKER_ON_UNVERIFIABLE", "report")
    monkeypatch.setenv("MEMBROKER_ATTACH_WITHOUT_GRANT", "true")
    cfg = load_config()
    assert (cfg.hello_timeout_s, cfg.on_unverifiable, cfg.attach_without_grant) == (
        0.5,
        "report",
        True,
    )


def test_state_dir(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("MEMBROKER_")]:
        monkeypatch.delenv(var)
    rt = tmp_path / "rt"
    assert load_config(runtime_dir=rt).journal_dir == tmp_path / "rt.state"
    assert load_config(runtime_dir="/run/membroker").journal_dir == Path("/var/lib/membroker")
    assert load_config(runtime_dir=rt, state_dir="").journal_dir is None
    assert load_config(runtime_dir=rt, state_dir="/srv/mb/").journal_dir == Path("/srv/mb")
    monkeypatch.setenv("MEMBROKER_STATE_DIR", "")
    assert load_config(runtime_dir=rt).journal_dir is None
    with pytest.raises(ConfigError, match=r"state_dir.*not an absolute path"):
        load_config(runtime_dir=rt, state_dir="relative/dir")
