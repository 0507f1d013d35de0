"""Helpers for the deployment tests: paths, tool lookup, and a real membrokerd child process.

A uniquely named module (not conftest) so that test modules can import it whatever other
conftest.py files the run has loaded.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Sequence
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


def samples(exposition: str) -> dict[str, float]:
    """{series (name and labels, as exposed): value} of a classic text exposition."""
    out = {}
    for line in exposition.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Daemon:
    """membrokerd as a child process; `argv_prefix` may wrap it (setpriv, a prctl shim).
    `command` replaces `python -m membrokerd` (an installed console script, say), run in `cwd`
    with `env` (default: this checkout's code, see child_env)."""

    def __init__(
        self,
        runtime_dir: Path,
        argv_prefix: Sequence[str] = (),
        command: Sequence[str] = (sys.executable, "-m", "membrokerd"),
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 20.0,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.log_path = runtime_dir.parent / f"{runtime_dir.name}.stderr"
        self.stdout_text = ""
        self.metrics_url = ""
        self.returncode: int | None = None
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    *argv_prefix,
                    *command,
                    "--runtime-dir",
                    str(runtime_dir),
                    "--metrics-address",
                    "127.0.0.1:0",
                ],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env if env is not None else child_env(),
            )
        self.pid = self.proc.pid
        try:
            self._wait_ready(ready_timeout)
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


# -- a real systemd manager (see test_systemd_manager.py) ------------------------------------

SERVICE = "membrokerd.service"
SOCKET = "membrokerd.socket"
WATCHDOG_SEC = 2
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
SYSTEMD = Path("/lib/systemd/systemd")

# Run inside `unshare --mount`: everything it mounts is private to the namespace and goes with it.
_MANAGER_SCRIPT = r"""
set -eu
base=$1; cg=$2
# A fresh /run: the manager's "booted with systemd" check (/run/systemd/system), the nodes
# ProtectSystem= and friends bind over hidden paths, and whatever the manager writes under /run
# stay in this namespace. (A mount point /run also keeps ProtectKernelTunables= from mounting
# an empty tmpfs over it.)
mount -n -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd/system /run/systemd/inaccessible
cd /run/systemd/inaccessible
mkdir dir; : > reg; mkfifo fifo; mknod chr c 0 0; mknod blk b 0 0
python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")'
chmod 0000 dir reg fifo sock chr blk
cd /
for root in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
    mkdir "$root/$cg"
    echo $$ > "$root/$cg/cgroup.procs"
done
export HOME=$base/home XDG_RUNTIME_DIR=$base/xdg XDG_CONFIG_HOME=$base/config
unset DBUS_SESSION_BUS_ADDRESS NOTIFY_SOCKET LISTEN_FDS LISTEN_PID LISTEN_FDNAMES
exec timeout --signal=TERM --kill-after=10 300 "$3" --user
"""


def skip_unless_manager_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: a systemd manager with its own cgroup subtree")
    for tool in ("unshare", "systemctl", "timeout", "mknod", "mkfifo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not SYSTEMD.exists():
        pytest.skip(f"{SYSTEMD} is missing (Debian package systemd)")
    for root in CGROUP_ROOTS:
        if not (root / "cgroup.procs").exists():
            pytest.skip(f"{root} is not a cgroup hierarchy (this harness expects the v1 hybrid)")


class UserManager:
    """`systemd --user` in a private mount namespace and cgroup subtree, with its units."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.cgroup = base.name
        self.xdg = base / "xdg"
        self.runtime_dir = self.xdg / "membroker"
        self.units = base / "config" / "systemd" / "user"
        self.config = base / "membrokerd.toml"
        self.log = base / "daemon.log"
        for d in (self.xdg, base / "home", self.units / f"{SERVICE}.d"):
            d.mkdir(parents=True, mode=0o700)
        self.env = dict(os.environ)
        self.env["XDG_RUNTIME_DIR"] = str(self.xdg)
        self.env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        self.env["SYSTEMD_PAGER"] = ""
        self.proc: subprocess.Popen[bytes] | None = None

    # -- set up and tear down ------------------------------------------------------------------

    def install_units(self) -> None:
        """The shipped units, paths pointed at this manager's runtime dir, plus the drop-in."""
        for name in (SERVICE, SOCKET):
            text = (DEPLOY / name).read_text().replace("/run/membroker", str(self.runtime_dir))
            (self.units / name).write_text(text)
        venv_bin = Path(sys.executable).parent
        binds = sorted({str(Path(sys.base_prefix).resolve()), str(Path(sys.prefix).resolve())})
        (self.units / f"{SERVICE}.d" / "test.conf").write_text(
            "[Service]\n"
            "ExecStart=\n"
            f"ExecStart={venv_bin / 'membrokerd'} --config {self.config}\n"
            "ProtectHome=tmpfs\n"
            f"BindReadOnlyPaths={' '.join(binds)} {ROOT}\n"
            f"BindPaths={self.base}\n"
            f"Environment=PYTHONPATH={ROOT / 'clients'}:{ROOT / 'broker'}\n"
            f"StandardOutput=append:{self.log}\n"
            f"StandardError=append:{self.log}\n"
            f"WatchdogSec={WATCHDOG_SEC}s\n"
            "LimitCORE=0\n"
            # The tests start the service more often than the shipped burst allows.
            "[Unit]\nStartLimitBurst=100\n"
        )
        self.write_config()

    def write_config(self, **settings: object) -> None:
        values: dict[str, object] = {"runtime_dir": str(self.runtime_dir), "metrics_address": ""}
        values.update(settings)
        lines = []
        for key, value in values.items():
            lines.append(f"{key} = {value!r}" if isinstance(value, str) else f"{key} = {value}")
        self.config.write_text("\n".join(lines).replace("'", '"') + "\n")

    def start(self) -> None:
        script = self.base / "manager.sh"
        script.write_text(_MANAGER_SCRIPT)
        with open(self.base / "manager.log", "wb") as out:
            self.proc = subprocess.Popen(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    str(script),
                    str(self.base),
                    self.cgroup,
                    str(SYSTEMD),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if (self.xdg / "systemd" / "private").exists():
                probe = self.systemctl("show", "-p", "Version", check=False)
                if probe.returncode == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(
            "systemd --user did not come up: "
            + (self.base / "manager.log").read_text(errors="replace")
        )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError):
                self.systemctl("stop", SERVICE, SOCKET, check=False, timeout=30)
            # timeout(1) passes SIGTERM on to the manager, which stops its units and exits.
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # Whatever still sits in our cgroups was started by this manager: end it by pid.
        for _ in range(50):
            pids = self._cgroup_pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for root in CGROUP_ROOTS:
            top = root / self.cgroup
            if top.exists():
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
                    with contextlib.suppress(OSError):
                        d.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()

    def _cgroup_pids(self) -> set[int]:
        pids: set[int] = set()
        for root in CGROUP_ROOTS:
            top = root / self.cgroup
            if top.exists():
                for procs in top.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError):
                        pids.update(int(p) for p in procs.read_text().split())
        return pids

    # -- talking to it -------------------------------------------------------------------------

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["systemctl", "--user", "--no-pager", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"systemctl {' '.join(args)} failed ({result.returncode}): {result.stderr}\n"
                f"{self.status()}"
            )
        return result

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"-p{p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def status(self) -> str:
        out = subprocess.run(
            ["systemctl", "--user", "--no-pager", "status", SERVICE, SOCKET],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        log = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"{out}\n--- daemon log ---\n{log[-4000:]}"

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.status()}")

    def main_pid(self) -> int:
        return int(self.show(SERVICE, "MainPID")["MainPID"])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def reset(self) -> None:
        """Nothing running, nothing failed, config back to the default."""
        self.systemctl("stop", SERVICE, SOCKET, check=False)
        self.systemctl("reset-failed", SERVICE, SOCKET, check=False)
        self.write_config()
