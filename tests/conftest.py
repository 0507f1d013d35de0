"""Shared fixtures: a real membrokerd process per test and real client processes."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from membroker._sys import hugetlb_free_pages

ROOT = Path(__file__).resolve().parent.parent
CLIENT_PROC = ROOT / "tests" / "integration" / "client_proc.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "clients"), str(ROOT / "broker")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `check()` comes true within `timeout` seconds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    """`wait_until`, failing the test (naming `what`) when it does not come true."""
    if not wait_until(check, timeout):
        raise AssertionError(f"timed out waiting for {what}")


class Daemon:
    """A membrokerd child process with its own runtime directory."""

    def __init__(self, runtime_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.runtime_dir = runtime_dir
        self.log_path = runtime_dir.parent / f"{runtime_dir.name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "membrokerd",
                "--runtime-dir",
                str(runtime_dir),
                "--metrics-address",
                "127.0.0.1:0",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env or _env(),
        )
        self.pid = self.proc.pid
        self.metrics_url = ""
        deadline = time.monotonic() + 20
        assert self.proc.stdout is not None
        out = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                out += chunk
                for line in out.decode(errors="replace").splitlines():
                    if "metrics:" in line and out.endswith(b"\n"):
                        self.metrics_url = line.split("metrics:", 1)[1].strip()
                        return
            if self.proc.poll() is not None:
                break
        lines = out.decode(errors="replace")
        self.stop()
        raise RuntimeError(f"membrokerd did not start: {lines} {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:
            text: str = resp.read().decode()
        return text

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "3000")
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
    assert not (d.runtime_dir / "control.sock").exists()
    assert not (d.runtime_dir / "session.sock").exists()


class PeerProc:
    """A real peer process driven by JSON lines: one request per line on stdin, one answer per
    line on stdout, a first line {"ready": true}. tests/integration/client_proc.py,
    tests/peers/vmm_proc.py and tests/peers/bridge_proc.py speak it."""

    def __init__(self, script: Path, runtime_dir: Path, name: str, *extra: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(script),
                "--runtime-dir",
                str(runtime_dir),
                "--name",
                name,
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        self.pid = self.proc.pid
        hello = self._read(30)
        assert hello.get("ready"), hello

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"peer {self.name} did not answer in {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            return {"dead": True, "returncode": self.proc.wait(10), "stderr": err}
        result: dict[str, Any] = json.loads(line)
        return result

    def cmd(self, op: str, timeout: float = 20, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read(timeout)

    def ok(self, op: str, **kw: Any) -> dict[str, Any]:
        out = self.cmd(op, **kw)
        assert out.get("ok"), out
        return out

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("exit", timeout=10)
                self.proc.wait(10)
            except (OSError, TimeoutError, subprocess.TimeoutExpired, ValueError):
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream:
                # A process that died with a command unread: its stdin's flush is EPIPE. The
                # stream is closed all the same, and the caller's clean-up goes on.
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


class ClientProc(PeerProc):
    """A real client process (tests/integration/client_proc.py)."""

    def __init__(self, runtime_dir: Path, name: str) -> None:
        super().__init__(CLIENT_PROC, runtime_dir, name)


@pytest.fixture
def clients(daemon: Daemon) -> Iterator[Any]:
    started: list[ClientProc] = []

    def start(name: str) -> ClientProc:
        c = ClientProc(daemon.runtime_dir, name)
        started.append(c)
        return c

    yield start
    for c in started:
        c.close()


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP `pid` and wait until every one of its threads is stopped (state T).

    kill() returns once the signal is queued; a thread busy on another CPU stops a moment
    later. A test that relies on the process being frozen must not race that moment.
    """
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    # "pid (comm) S ...": the state follows the last ')'.
                    states.append(f.read().rsplit(b")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states and all(s in (b"T", b"t") for s in states):
            return
        time.sleep(0.005)
    raise TimeoutError(f"process {pid} did not stop within {timeout} s")


@contextlib.contextmanager
def daemon_and_clients(
    tmp_path: Path, deadline_ms: int, audit_interval_s: float
) -> Iterator[tuple[Daemon, Any]]:
    """A daemon with this revoke deadline and audit interval, and a `start(name)` that runs
    client processes; every process is resumed (if stopped) and ended afterwards, by pid."""
    env = dict(_env(), MEMBROKER_AUDIT_INTERVAL_S=str(audit_interval_s))
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", str(deadline_ms), env=env)
    procs: list[ClientProc] = []

    def start(name: str) -> ClientProc:
        p = ClientProc(d.runtime_dir, name)
        procs.append(p)
        return p

    try:
        yield d, start
    finally:
        for p in procs:
            if p.proc.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
            p.close()
        assert d.stop() == 0, d.log()


HUGE_2M = 2 << 20


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
