"""Helpers for the deployment tests: paths, tool lookup, and a real membrokerd child process.

A uniquely named module (not conftest) so that test modules can import it whatever other
conftest.py files the run has loaded.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "membrokerd.service"
EXAMPLE_CONFIG = DEPLOY / "membrokerd.toml"
RULES = DEPLOY / "prometheus" / "membroker-rules.yml"
RULES_TEST = Path(__file__).resolve().parent / "membroker-rules.test.yml"


def require_tool(name: str) -> str:
    """The tool's path, or a skip that says which Debian package provides it."""
    path = shutil.which(name, path=os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin")
    if path is None:
        package = {
            "promtool": "prometheus",
            "prometheus": "prometheus",
            "systemd-analyze": "systemd",
            "setpriv": "util-linux",
        }.get(name, name)
        pytest.skip(
            f"{name} is not installed (Debian package {package}; CI installs the "
            "packages listed in deploy/test-packages.txt)"
        )
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "clients"), str(ROOT / "broker")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # The settings under test come from the command line, not from the caller's environment.
    for key in list(env):
        if key.startswith("MEMBROKER_"):
            del env[key]
    env.pop("NOTIFY_SOCKET", None)
    return env


class Daemon:
    """membrokerd as a child process; `argv_prefix` may wrap it (setpriv, a prctl shim)."""

    def __init__(self, runtime_dir: Path, argv_prefix: Sequence[str] = ()) -> None:
        self.runtime_dir = runtime_dir
        self.log_path = runtime_dir.parent / f"{runtime_dir.name}.stderr"
        self.stdout_text = ""
        self.metrics_url = ""
        self.returncode: int | None = None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *argv_prefix,
                    sys.executable,
                    "-m",
                    "membrokerd",
                    "--runtime-dir",
                    str(runtime_dir),
                    "--metrics-address",
                    "127.0.0.1:0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=child_env(),
            )
        self.pid = self.proc.pid
        try:
            self._wait_ready(20.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Reads the raw stdout fd until the 'metrics:' line is complete."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.2):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    out += chunk
                    self.stdout_text = out.decode(errors="replace")
                    for line in self.stdout_text.splitlines(keepends=True):
                        if "metrics:" in line and line.endswith("\n"):
                            self.metrics_url = line.split("metrics:", 1)[1].strip()
                            return
                elif self.proc.poll() is not None:
                    break
        raise RuntimeError(
            f"membrokerd did not become ready (rc={self.proc.poll()}):\n"
            f"stdout: {out.decode(errors='replace')}\nstderr: {self.log()}"
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> tuple[str, str]:
        """(Content-Type, body) of GET /metrics."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            assert resp.status == 200
            return resp.headers.get("Content-Type", ""), resp.read().decode()

    def send_garbage_frame(self) -> bytes:
        """One oversized session frame: the broker answers with an error frame and hangs up."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.runtime_dir / "session.sock"))
            s.sendall(struct.pack("<I", 0xFFFFFFFF) + b"\0" * 16)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            return reply

    def stop(self) -> int:
        """SIGTERM by pid, wait; returns the exit status (idempotent)."""
        if self.returncode is None:
            if self.proc.poll() is None:
                os.kill(self.pid, signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.kill(self.pid, signal.SIGKILL)
                    self.proc.wait(5)
            self.returncode = self.proc.returncode
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        return self.returncode
