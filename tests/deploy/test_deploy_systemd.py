"""deploy/membrokerd.service: what it declares, `systemd-analyze verify` with nothing on stderr,
its hardening score, and the daemon really running inside the unit's capability set and
write-xor-execute memory policy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, EXAMPLE_CONFIG, UNIT, Daemon, require_tool

from membrokerd.config import load_config

# Measured with systemd 252 (Debian 12) on this unit: 2.4 ("OK"). A change that weakens the
# sandbox raises it; lower this bound when the unit gets stricter.
MAX_EXPOSURE = 2.4

INSTALLED_EXEC = "/usr/local/bin/membrokerd"


def unit_settings(text: str) -> dict[str, list[str]]:
    """[Service]/[Unit]/[Install] keys -> every value given (systemd allows repeats)."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {raw!r}"
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_declares_the_service_contract() -> None:
    s = unit_settings(UNIT.read_text())
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify"
    assert one["Restart"] == "on-failure"
    assert one["ExecStart"] == f"{INSTALLED_EXEC} --config /etc/membroker/membrokerd.toml"
    assert one["RuntimeDirectory"] == "membroker"
    assert one["RuntimeDirectoryMode"] == "0755"
    assert one["DevicePolicy"] == "closed"
    assert s["DeviceAllow"] == ["/dev/kvm rw"]
    assert one["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictSUIDSGID",
        "RestrictRealtime",
    ):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert one["SystemCallArchitectures"] == "native"
    assert one["WantedBy"] == "multi-user.target"
    # systemd integration: reload by SIGHUP, a watchdog, and a runtime directory that outlives
    # the service (membrokerd.socket's sockets live in it).
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["WatchdogSec"] == "30s"
    assert one["NotifyAccess"] == "main"
    assert one["RuntimeDirectoryPreserve"] == "yes"


SOCKET_UNIT = DEPLOY / "membrokerd.socket"


def test_socket_unit_matches_the_service_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """membrokerd.socket listens where the daemon's config puts its sockets, with their mode."""
    for var in [v for v in os.environ if v.startswith("MEMBROKER_")]:
        monkeypatch.delenv(var)
    s = unit_settings(SOCKET_UNIT.read_text())
    config = load_config(EXAMPLE_CONFIG)
    assert s["ListenStream"] == [str(config.control_socket), str(config.session_socket)]
    assert config.control_socket_mode == config.session_socket_mode  # one SocketMode= for both
    assert int(s["SocketMode"][-1], 8) == config.control_socket_mode
    assert s["Service"] == ["membrokerd.service"]
    assert s["WantedBy"] == ["sockets.target"]
    assert "Accept" not in s  # one daemon takes the listening sockets over


def test_unit_runtime_directory_matches_example_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """ProtectSystem=strict leaves only /run/<RuntimeDirectory> writable: the config must use it."""
    for var in [v for v in os.environ if v.startswith("MEMBROKER_")]:
        monkeypatch.delenv(var)
    s = unit_settings(UNIT.read_text())
    config = load_config(EXAMPLE_CONFIG)
    assert config.runtime_dir == Path("/run") / s["RuntimeDirectory"][-1]


def _socket_copy(tmp_path: Path) -> Path:
    """membrokerd.socket next to the service copy (verify loads the service it triggers)."""
    _unit_copy(tmp_path)
    copy = tmp_path / SOCKET_UNIT.name
    copy.write_text(SOCKET_UNIT.read_text())
    return copy


def _unit_copy(tmp_path: Path, extra: str = "") -> Path:
    """The unit with ExecStart pointing at this environment's membrokerd (verify checks it)."""
    exe = Path(sys.executable).parent / "membrokerd"
    if not exe.exists():
        found = shutil.which("membrokerd")
        if found is None:
            pytest.skip("no membrokerd console script next to the interpreter or on PATH")
        exe = Path(found)
    text, n = re.subn(
        rf"^ExecStart={re.escape(INSTALLED_EXEC)} ",
        f"ExecStart={exe} ",
        UNIT.read_text(),
        flags=re.M,
    )
    assert n == 1, "ExecStart line not found"
    copy = tmp_path / "membrokerd.service"
    copy.write_text(text + extra)
    return copy


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("systemd-analyze")
    return subprocess.run(
        [tool, "verify", unit.name], cwd=unit.parent, capture_output=True, text=True, timeout=60
    )


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    """verify exits 0 even on unknown keys and bad values, so stderr must be empty too."""
    result = _verify(_unit_copy(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert result.stdout == "", result.stdout


def test_systemd_analyze_verify_socket_unit_is_silent(tmp_path: Path) -> None:
    result = _verify(_socket_copy(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert result.stdout == "", result.stdout


def test_systemd_analyze_verify_would_catch_a_bad_key(tmp_path: Path) -> None:
    """The check above is meaningful: a typo and a bad value do show up on stderr (rc still 0)."""
    bad = "[Service]\nMemoryDenyWriteExcute=yes\nProtectHome=maybe\n"
    result = _verify(_unit_copy(tmp_path, bad))
    assert "MemoryDenyWriteExcute" in result.stderr, result.stderr
    assert "maybe" in result.stderr, result.stderr


def test_security_exposure_score(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    unit = _unit_copy(tmp_path)
    result = subprocess.run(
        [tool, "security", "--offline=true", unit.name],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(
        r"Overall exposure level for membrokerd\.service: ([0-9.]+) (\w+)", result.stdout
    )
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    print(f"systemd-analyze security exposure: {score} {match.group(2)}")
    assert score <= MAX_EXPOSURE, result.stdout

    # The checks the unit is built around are all reported as met.
    short = subprocess.run(
        [tool, "security", "--offline=true", "--json=short", unit.name],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    met = {item["name"]: item["set"] for item in json.loads(short.stdout)}
    for name in (
        "NoNewPrivileges=",
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "MemoryDenyWriteExecute=",
        "SystemCallArchitectures=",
        "LockPersonality=",
        "RestrictSUIDSGID=",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "SystemCallFilter=~@privileged",
        "RestrictNamespaces=~user",
    ):
        assert met.get(name) is True, (name, met.get(name))


# linux/capability.h numbers of the capabilities the unit keeps.
CAP_NUMBERS = {"CAP_DAC_READ_SEARCH": 2, "CAP_KILL": 5, "CAP_SYS_PTRACE": 19}

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

# Run by the child before exec'ing membrokerd: the kernel's own write-xor-execute policy
# (inherited across execve) refuses W+X mappings and mprotect(PROT_EXEC) gains, like systemd's
# MemoryDenyWriteExecute=yes filter.
_MDWE_SHIM = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: errno %d" % ctypes.get_errno())
os.execv(sys.argv[1], sys.argv[1:])
"""


def _kernel_has_mdwe() -> bool:
    """Probe PR_SET_MDWE in a throw-away child (it cannot be undone in this process)."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); "
            f"sys.exit(0 if l.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0 "
            "else ctypes.get_errno())",
        ],
        timeout=30,
    )
    return probe.returncode == 0


def test_daemon_runs_under_the_units_sandbox(tmp_path: Path) -> None:
    """The daemon starts, serves and exits 0 on SIGTERM with exactly the unit's bounding set,
    no_new_privs, and write-xor-execute memory (why MemoryDenyWriteExecute=yes is safe)."""
    setpriv = require_tool("setpriv")
    if not _kernel_has_mdwe():
        pytest.skip("kernel lacks prctl(PR_SET_MDWE) (Linux >= 6.3)")
    caps = unit_settings(UNIT.read_text())["CapabilityBoundingSet"][-1].split()
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    prefix = [
        setpriv,
        "--no-new-privs",
        f"--bounding-set={bounding}",
        "--inh-caps=-all",
        sys.executable,
        "-c",
        _MDWE_SHIM,
    ]
    d = Daemon(tmp_path / "rt", argv_prefix=prefix)
    try:
        status = Path(f"/proc/{d.pid}/status").read_text()
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        cap_bnd = re.search(r"^CapBnd:\s+([0-9a-f]+)$", status, re.M)
        assert cap_bnd, status
        assert int(cap_bnd.group(1), 16) == sum(1 << CAP_NUMBERS[c] for c in caps), status
        assert "membrokerd ready" in d.stdout_text
        reply = d.send_garbage_frame()
        assert b"exceeds the limit" in reply
        _, body = d.scrape()
        assert "membroker_session_protocol_errors_total 1.0" in body
    finally:
        rc = d.stop()
    assert rc == 0, d.log()
    assert not (d.runtime_dir / "control.sock").exists()
    assert not (d.runtime_dir / "session.sock").exists()


def test_mdwe_shim_really_forbids_wx_memory(tmp_path: Path) -> None:
    """Self-check of the sandbox test: under the shim a W+X mapping is refused."""
    if not _kernel_has_mdwe():
        pytest.skip("kernel lacks prctl(PR_SET_MDWE) (Linux >= 6.3)")
    code = (
        "import mmap\ntry:\n    mmap.mmap(-1, 4096, prot=7)\nexcept PermissionError:\n"
        "    raise SystemExit(0)\nraise SystemExit('W+X mapping was allowed')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", _MDWE_SHIM, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_outside_a_service_a_stop_is_never_taken_for_good() -> None:
    """Whether a stop ends the spaces for good is asked of the manager only from inside a
    systemd service (NOTIFY_SOCKET and INVOCATION_ID): anywhere else the answer is "cannot
    tell" (False), and sessions are told to resume, as before. (The asking itself runs under
    a real manager in tests/deploy/test_restart.py.)"""
    from membrokerd import systemd

    assert systemd.stopping_for_good(env={}) is False
    assert systemd.stopping_for_good(env={"NOTIFY_SOCKET": "/run/x"}) is False
    assert systemd.stopping_for_good(env={"INVOCATION_ID": "0" * 32}) is False
