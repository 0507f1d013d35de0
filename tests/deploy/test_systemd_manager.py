"""membrokerd under a real systemd manager: `systemd --user` in a private mount namespace (see
PEERS.md, "systemd"), running the shipped membrokerd.service and membrokerd.socket with a test
drop-in. Type=notify readiness, the watchdog (and what a stalled event loop gets), STATUS=,
`systemctl reload`, and socket activation, all as systemd itself sees them.

The drop-in changes only what this sandbox needs: the command (this checkout's venv, its config),
ProtectHome=tmpfs plus read-only binds for the interpreter (it lives under /root), the test's
directory bound in (PrivateTmp= hides /tmp), logs to a file (no journald), WatchdogSec=2s, and
no core files. Every other hardening setting of the shipped unit is in force.

How the loop is stalled without any test hook in the daemon: the test ptrace-stops the daemon's
main thread only (PTRACE_SEIZE + PTRACE_INTERRUPT act on one thread), while it waits in
epoll_wait, so the GIL is free: every other thread (the watchdog's, gRPC's) keeps running, exactly
like a loop stuck in a system call. The watchdog thread sees the loop's heartbeat go stale, stops
pinging, and systemd aborts and restarts the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from deploy_helpers import (
    SERVICE,
    SOCKET,
    WATCHDOG_SEC,
    UserManager,
    child_env,
)

import membroker


def _status_text(m: UserManager) -> str:
    return m.show(SERVICE, "StatusText")["StatusText"]


# -- (a) Type=notify ------------------------------------------------------------------------------


def test_notify_start_reaches_active_and_stops_cleanly(sd: UserManager) -> None:
    t0 = time.monotonic()
    sd.systemctl("start", SERVICE)  # returns once the daemon said READY=1
    started = time.monotonic() - t0
    state = sd.show(SERVICE, "ActiveState", "SubState", "MainPID", "Type", "WatchdogUSec")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), sd.status()
    assert state["Type"] == "notify"
    assert state["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
    pid = int(state["MainPID"])
    assert (sd.runtime_dir / "membrokerd.lock").read_text().strip() == str(pid)
    # Not activated by the socket unit: it bound its sockets itself, with the config's mode.
    for name in ("control.sock", "session.sock"):
        st = os.lstat(sd.runtime_dir / name)
        assert oct(st.st_mode & 0o777) == "0o660", name
    with membroker.connect("notify-a", str(sd.runtime_dir)) as s:
        assert s.broker_pid == pid
    print(f"systemctl start returned after {started:.2f} s")

    sd.systemctl("stop", SERVICE)
    state = sd.show(SERVICE, "ActiveState", "Result", "ExecMainStatus")
    assert state == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    # It removed what it created; the runtime directory itself stays (RuntimeDirectoryPreserve).
    assert sorted(p.name for p in sd.runtime_dir.iterdir()) == []


# -- (b) watchdog ---------------------------------------------------------------------------------

PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000
# x86-64 syscalls a thread waits in with the GIL released (uvloop's libuv waits in epoll).
EPOLL_WAITS = {232, 281, 441}  # epoll_wait, epoll_pwait, epoll_pwait2
ORIG_RAX = 15  # index in struct user_regs_struct (27 unsigned longs)


class ThreadStopper:
    """Stops one thread (the daemon's main thread, which runs its event loop) with ptrace,
    leaving the process's other threads running."""

    def __init__(self, tid: int) -> None:
        self.tid = tid
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self.libc.ptrace.restype = ctypes.c_long
        self.attached = False
        self.reaped = False

    def _ptrace(self, request: int, data: int | None = None, addr: int | None = None) -> None:
        if self.libc.ptrace(request, self.tid, addr, data) == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"ptrace({request:#x}, {self.tid}): {os.strerror(err)}")

    def stop_in_epoll_wait(self, attempts: int = 100) -> int:
        """Stops the thread; retries until it is caught waiting in epoll (GIL not held).
        Returns the syscall it was stopped in."""
        self._ptrace(PTRACE_SEIZE, 0)
        self.attached = True
        regs = (ctypes.c_ulong * 27)()
        for _ in range(attempts):
            self._ptrace(PTRACE_INTERRUPT)
            _, status = os.waitpid(self.tid, WALL)
            assert os.WIFSTOPPED(status), status
            self._ptrace(PTRACE_GETREGS, ctypes.addressof(regs))
            nr = regs[ORIG_RAX]
            if nr in EPOLL_WAITS:
                return int(nr)
            self._ptrace(PTRACE_CONT, 0)
            time.sleep(0.01)
        raise AssertionError("the event loop thread was never caught waiting in epoll")

    def reap_exit(self, timeout: float) -> int | None:
        """As its tracer we learn of its death first; collecting that lets systemd see it.
        Returns the wait status, or None if it did not die in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(self.tid, WALL | os.WNOHANG)
            except ChildProcessError:
                self.reaped = True
                return None
            if pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
                self.reaped = True
                return status
            time.sleep(0.02)
        return None

    def release(self) -> None:
        if self.attached and not self.reaped:
            with contextlib.suppress(OSError):
                self._ptrace(PTRACE_DETACH, 0)


def test_watchdog_kept_fed_while_the_loop_runs_and_a_stalled_loop_is_restarted(
    sd: UserManager,
) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("the loop-stall helper reads x86-64 registers")
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    restarts = int(sd.show(SERVICE, "NRestarts")["NRestarts"])

    # Alive through more than three watchdog intervals: the daemon feeds it.
    time.sleep(3 * WATCHDOG_SEC + 0.5)
    state = sd.show(SERVICE, "ActiveState", "MainPID", "NRestarts", "Result")
    assert state == {
        "ActiveState": "active",
        "MainPID": str(pid),
        "NRestarts": str(restarts),
        "Result": "success",
    }, sd.status()
    assert "systemd watchdog: 2 s" in sd.log_text()

    stopper = ThreadStopper(pid)
    try:
        t0 = time.monotonic()
        stopper.stop_in_epoll_wait()
        status = stopper.reap_exit(timeout=4 * WATCHDOG_SEC + 5)
        killed_after = time.monotonic() - t0
        assert status is not None, "systemd did not stop the stalled daemon\n" + sd.status()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGABRT, status
    finally:
        stopper.release()
    # The kill came from the watchdog: at most one interval after the last ping, and the last
    # ping at most half an interval after the stall.
    assert killed_after < 2 * WATCHDOG_SEC + 1, killed_after
    # The watchdog thread ran through the stall and judged the loop dead.
    assert "event loop stalled" in sd.log_text(), sd.log_text()

    def restarted() -> bool:
        s = sd.show(SERVICE, "ActiveState", "MainPID", "NRestarts")
        return s["ActiveState"] == "active" and s["MainPID"] not in ("0", str(pid))

    sd.wait_for("the restart", restarted, timeout=20)
    assert int(sd.show(SERVICE, "NRestarts")["NRestarts"]) == restarts + 1
    with membroker.connect("after-restart", str(sd.runtime_dir)) as s:
        assert s.broker_pid == sd.main_pid()
    print(f"stalled loop: SIGABRT after {killed_after:.2f} s (WatchdogSec={WATCHDOG_SEC})")


# -- (c) STATUS= ----------------------------------------------------------------------------------


def test_status_text_shows_spaces_sessions_and_last_revoke(sd: UserManager) -> None:
    sd.systemctl("start", SERVICE)
    assert _status_text(sd).startswith("0 spaces, 0 sessions"), _status_text(sd)
    with (
        membroker.connect("owner", str(sd.runtime_dir)) as owner,
        membroker.connect("other", str(sd.runtime_dir)),
    ):
        space = owner.create_space(1 << 20)
        space.share(0, 1 << 20)
        space.grant("c1", 0, 1 << 20, "rw")
        sd.wait_for(
            "StatusText with 1 space and 2 sessions",
            lambda: _status_text(sd).startswith("1 space, 2 sessions, 0 revokes"),
        )
        space.revoke("c1", 0, 4096)
        sd.wait_for("StatusText with the revoke", lambda: "last revoke" in _status_text(sd))
        text = _status_text(sd)
        assert f"space {space.space_id[:12]}" in text, text
        assert re.search(r"1 revoke; last revoke \d\d:\d\d:\d\d ", text), text
    sd.wait_for(
        "StatusText with no sessions", lambda: _status_text(sd).startswith("1 space, 0 sessions")
    )
    print("StatusText:", _status_text(sd))


# -- (d) reload -----------------------------------------------------------------------------------


def _log_after(sd: UserManager, mark: int, needle: str) -> Callable[[], bool]:
    return lambda: needle in sd.log_text()[mark:]


def test_reload_applies_live_settings_in_the_same_process(sd: UserManager) -> None:
    sd.systemctl("start", SERVICE)
    pid = sd.main_pid()
    with membroker.connect("first", str(sd.runtime_dir)):
        # A live setting: the broker reads max_sessions at every accept.
        mark = len(sd.log_text())
        sd.write_config(max_sessions=1, log_level="DEBUG", loop_probe_ms=50.0)
        sd.systemctl("reload", SERVICE)
        sd.wait_for("the reload", _log_after(sd, mark, "reloaded: applied"))
        log = sd.log_text()[mark:]
        assert "max_sessions=1" in log and "log_level='DEBUG'" in log, log
        assert "only take effect after a restart were NOT applied: loop_probe_ms" in log, log
        with pytest.raises(membroker.ConnectError, match="too many sessions"):
            membroker.connect("second", str(sd.runtime_dir), timeout=5)

        # An invalid file: refused, logged, the running configuration kept.
        mark = len(sd.log_text())
        sd.config.write_text('max_sessions = "many"\n')
        sd.systemctl("reload", SERVICE)
        sd.wait_for("the refused reload", _log_after(sd, mark, "reload refused"))
        assert "max_sessions" in sd.log_text()[mark:]
        sd.wait_for("StatusText saying so", lambda: "reload at" in _status_text(sd))
        with pytest.raises(membroker.ConnectError, match="too many sessions"):
            membroker.connect("third", str(sd.runtime_dir), timeout=5)

        # Fixed again: back to the default limit.
        mark = len(sd.log_text())
        sd.write_config()
        sd.systemctl("reload", SERVICE)
        sd.wait_for("the third reload", _log_after(sd, mark, "reloaded: applied"))
        with membroker.connect("fourth", str(sd.runtime_dir)):
            pass
    state = sd.show(SERVICE, "ActiveState", "MainPID", "NRestarts")
    assert state["ActiveState"] == "active" and state["MainPID"] == str(pid), sd.status()
    assert "reload at" not in _status_text(sd)


# -- (e) socket activation ------------------------------------------------------------------------


def _grpc_health(path: Path) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"unix:{path}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=20
        )
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def test_socket_activation_starts_the_daemon_on_first_connection(sd: UserManager) -> None:
    sd.systemctl("start", SOCKET)
    sock_state = sd.show(SOCKET, "ActiveState", "SubState", "Listen")
    assert (sock_state["ActiveState"], sock_state["SubState"]) == ("active", "listening")
    assert sd.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"
    control, session = sd.runtime_dir / "control.sock", sd.runtime_dir / "session.sock"
    inodes = {p: os.lstat(p).st_ino for p in (control, session)}
    for p in (control, session):
        assert oct(os.lstat(p).st_mode & 0o777) == "0o660"

    # The SDK's first connection (session.sock) starts the daemon, and is served.
    t0 = time.monotonic()
    with membroker.connect("activated", str(sd.runtime_dir)) as s:
        first = time.monotonic() - t0
        pid = sd.main_pid()
        assert s.broker_pid == pid
        space = s.create_space(1 << 20)
        assert space.size == 1 << 20
        # gRPC on control.sock reaches the daemon too (through its relay).
        assert _grpc_health(control) == "SERVING"
    log = sd.log_text()
    assert "membrokerd ready" in log
    # It used systemd's sockets: still the very same files, nothing of its own bound there.
    assert {p: os.lstat(p).st_ino for p in (control, session)} == inodes

    # Stopped, the daemon leaves systemd's socket files alone; the socket unit still listens,
    # and a gRPC call on control.sock activates it again.
    sd.systemctl("stop", SERVICE)
    assert sd.show(SERVICE, "Result")["Result"] == "success"
    assert {p: os.lstat(p).st_ino for p in (control, session)} == inodes
    assert sd.show(SOCKET, "SubState")["SubState"] == "listening"
    assert _grpc_health(control) == "SERVING"
    assert sd.main_pid() not in (0, pid)
    assert sd.show(SERVICE, "ActiveState")["ActiveState"] == "active"
    assert {p: os.lstat(p).st_ino for p in (control, session)} == inodes
    print(f"first session through socket activation: {first:.2f} s")

    sd.systemctl("stop", SERVICE, SOCKET)
    # RemoveOnStop=yes: systemd removes its socket files with the socket unit.
    assert not control.exists() and not session.exists()
    assert sorted(p.name for p in sd.runtime_dir.iterdir()) == []


# -- socket activation without systemd ------------------------------------------------------------


def test_adopted_socket_bound_elsewhere_is_refused(tmp_path: Path) -> None:
    """A socket passed as "session" but bound at another path than the config's: the daemon
    refuses to start (clients would look for it where the config says), with a clear reason."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    rt = tmp_path / "rt"
    other = tmp_path / "elsewhere.sock"
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [
                tool,
                "-l",
                str(other),
                "--fdname=session",
                sys.executable,
                "-m",
                "membrokerd",
                "--runtime-dir",
                str(rt),
                "--metrics-address",
                "",
            ],
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        # systemd-socket-activate starts the program on the first connection.
        deadline = time.monotonic() + 10
        while not other.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(other))
            rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    stderr = (tmp_path / "log").read_text()
    assert rc == 1, stderr
    assert f"bound to {other}" in stderr, stderr
    assert other.exists()  # not ours: left alone
    assert not (rt / "membrokerd.lock").exists()


def test_notify_protocol_fields(tmp_path: Path) -> None:
    """The datagrams the daemon sends, as a manager receives them (no manager needed): READY=1
    with a STATUS= line, and RELOADING=1 with MONOTONIC_USEC then READY=1 on SIGHUP."""
    sock_path = tmp_path / "notify"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(sock_path))
    rx.settimeout(20)
    env = child_env()
    env["NOTIFY_SOCKET"] = str(sock_path)
    rt = tmp_path / "rt"
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "membrokerd", "--runtime-dir", str(rt), "--metrics-address", ""],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        got: list[str] = []

        def until(prefix: str) -> str:
            while True:
                msg = rx.recv(4096).decode()
                got.append(msg)
                if msg.startswith(prefix):
                    return msg

        ready = until("READY=1")
        assert re.fullmatch(r"READY=1\nSTATUS=0 spaces, 0 sessions, 0 revokes", ready), ready
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        os.kill(proc.pid, signal.SIGHUP)
        reloading = until("RELOADING=1")
        usec = int(reloading.split("MONOTONIC_USEC=", 1)[1])
        assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert until("READY=1") == "READY=1"
        os.kill(proc.pid, signal.SIGTERM)
        assert until("STOPPING=1").startswith("STOPPING=1")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        rx.close()


# -- the pieces, without a manager ----------------------------------------------------------------


def test_watchdog_pings_only_while_the_loop_runs(caplog: pytest.LogCaptureFixture) -> None:
    """The in-process logic of the stall test above, with a fake manager: pings every half
    interval while the loop runs, none once its heartbeat is older than half an interval,
    pings again when it runs again."""
    from membrokerd.systemd import Watchdog

    sent: list[float] = []

    async def scenario() -> tuple[int, int, int]:
        wd = Watchdog(0.4, send=lambda _msg: sent.append(time.monotonic()))
        wd.start(asyncio.get_running_loop())
        await asyncio.sleep(1.0)
        healthy = len(sent)
        time.sleep(1.2)  # the loop itself is stuck: no heartbeat, whatever the thread does
        during = len(sent) - healthy
        await asyncio.sleep(0.6)
        wd.stop()
        return healthy, during, len(sent) - healthy - during

    with caplog.at_level("WARNING", logger="membrokerd.systemd"):
        healthy, during, after = asyncio.run(scenario())
    assert healthy >= 4, sent  # every 0.2 s
    assert during <= 2, sent  # only while the last heartbeat was still fresh
    assert after >= 2, sent
    messages = [r.getMessage() for r in caplog.records]
    assert any("event loop stalled" in m for m in messages), messages
    assert any("event loop runs again" in m for m in messages), messages


def test_watchdog_and_listen_fds_are_for_this_pid_only() -> None:
    from membrokerd.systemd import listen_fds, watchdog_interval

    me = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": me}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:session"}
    assert listen_fds(env) == []
    assert env == {}  # never inherited by anything the daemon starts


def test_fd_store_messages_carry_the_fd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """FDSTORE=1 with the fd by SCM_RIGHTS, FDSTOREREMOVE=1 without; nothing without
    NOTIFY_SOCKET or with a store of 0 (FDSTORE=0 from systemd 254+)."""
    from membroker._sys import memfd as sys_memfd
    from membrokerd.systemd import fd_store_add, fd_store_enabled, fd_store_remove, split_passed

    path = tmp_path / "notify"
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(path))
    rx.settimeout(5)
    monkeypatch.delenv("FDSTORE", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    fd = sys_memfd.create_memfd("fdstore-test", 4096)
    try:
        assert not fd_store_add("sp-0123abcd", fd)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert fd_store_enabled()
        assert fd_store_add("sp-0123abcd", fd)
        msg, fds, _, _ = socket.recv_fds(rx, 4096, 4)
        assert msg.decode().split("\n") == ["FDSTORE=1", "FDNAME=sp-0123abcd", "FDPOLL=0"]
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino
        assert fd_store_remove("sp-0123abcd")
        msg, none, _, _ = socket.recv_fds(rx, 4096, 4)
        assert msg == b"FDSTOREREMOVE=1\nFDNAME=sp-0123abcd" and none == []
        monkeypatch.setenv("FDSTORE", "0")
        assert not fd_store_enabled() and not fd_store_add("sp-0123abcd", fd)

        # What comes back in LISTEN_FDS: sockets by name, space fds by space id, the rest closed.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other = os.open("/dev/null", os.O_RDONLY)
        sockets, stored = split_passed(
            [("control", sock.detach()), ("sp-0123abcd", fds[0]), ("junk", other)]
        )
        assert [name for name, _ in sockets] == ["control"]
        assert stored == {"sp-0123abcd": fds[0]}
        with pytest.raises(OSError):
            os.fstat(other)
        for _, s in sockets:
            s.close()
    finally:
        os.close(fd)
        for extra in fds:
            with contextlib.suppress(OSError):
                os.close(extra)
        rx.close()
