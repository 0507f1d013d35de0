"""Hardening of the daemon's edges (issue 7, items 9, 12, 13): bounded per-connection queues and
fair reading, one daemon per runtime directory, a safe runtime directory.

The `Connection` tests drive the real listener code over real socketpairs under both event loops
(asyncio's and uvloop); the rest start real membrokerd processes and real peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

import membroker
from membroker import wire
from membroker._sys import sock as sys_sock
from membroker._sys.memfd import create_memfd
from membroker.errors import ProtocolError
from membroker.v1 import session_pb2 as spb
from membrokerd.listener import FRAMES_PER_WAKEUP, Connection
from tests.conftest import Daemon, _env

NOBODY = 65534
MiB = 1 << 20

# -- Connection: bounded outbound queue, fair reading, fd ownership (real sockets, real loops) --

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, None]], None]]:
    """Runs a coroutine to completion on a fresh loop of the parametrised kind."""
    loop = LOOPS[request.param]()

    def run(coro: Coroutine[Any, Any, None]) -> None:
        loop.run_until_complete(asyncio.wait_for(coro, 30))

    yield run
    loop.close()


class Host:
    """A SessionHost that records what the connection hands it (frames, fds, errors, close)."""

    def __init__(self, on_frame: Callable[[Connection, spb.Frame, list[int]], None] | None = None):
        self.frames: list[tuple[Connection, spb.Frame]] = []
        self.closed: list[Connection] = []
        self.errors: list[str] = []
        self._on_frame = on_frame

    def on_frame(self, conn: Connection, frame: spb.Frame, fds: list[int]) -> None:
        self.frames.append((conn, frame))
        try:
            if self._on_frame is not None:
                self._on_frame(conn, frame, fds)
        finally:
            for fd in fds:  # the host owns handed fds: close them like the broker does
                os.close(fd)

    def on_closed(self, conn: Connection) -> None:
        self.closed.append(conn)

    def on_protocol_error(self, conn: Connection, error: ProtocolError) -> None:
        self.errors.append(str(error))


@contextlib.contextmanager
def connection(
    host: Host, **limits: int
) -> Iterator[tuple[Connection, socket.socket, asyncio.AbstractEventLoop]]:
    """A Connection on one end of a real socketpair; the test holds the peer end."""
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    cred = sys_sock.peer_credentials(ours)
    conn = Connection(loop, ours, host, 64 * 1024, cred, os.pidfd_open(os.getpid()), **limits)
    try:
        yield conn, peer, loop
    finally:
        conn.close("test over")
        peer.close()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def _big_frame(size: int) -> bytes:
    return wire.encode(spb.Frame(error=spb.Error(code=2, message="x" * size)))


def test_connection_pauses_then_drops_a_peer_that_never_reads(run) -> None:
    async def body() -> None:
        host = Host()
        limits = {"max_outbound_bytes": 512 * 1024, "outbound_pause_bytes": 64 * 1024}
        with connection(host, **limits) as (conn, _peer, _loop):
            frame = _big_frame(4000)
            # The kernel's socket buffer takes the first frames; then they queue with us.
            while conn.queued_bytes <= 64 * 1024:
                conn.send_encoded(frame)
            assert conn.paused and not conn.closed
            assert re.fullmatch(r"<Connection pid=\d+ uid=\d+ paused queued=\d+>", repr(conn))
            for _ in range(1000):
                before = conn.queued_bytes
                conn.send_encoded(frame)
                if conn.queued_bytes < before:
                    break
            assert before + len(frame) > 512 * 1024
            # At the cap the queue is dropped at once; the close waits for the next loop turn
            # (never under the sender's feet) and later sends are dropped.
            assert conn.queued_bytes == 0 and not conn.closed
            assert re.fullmatch(r"<Connection pid=\d+ uid=\d+ dropping queued=0>", repr(conn))
            conn.send_encoded(frame)
            assert conn.queued_bytes == 0
            await until(lambda: conn.closed)
            assert host.closed == [conn]
            assert re.fullmatch(
                r"peer does not read: \d+ bytes queued \(limit max_outbound_bytes = 524288\)",
                conn.close_reason,
            ), conn.close_reason
            queued = int(conn.close_reason.split()[4])
            assert 512 * 1024 < queued <= 512 * 1024 + len(frame)

    run(body())


def test_connection_resumes_reading_once_the_peer_drains(run) -> None:
    async def body() -> None:
        host = Host()
        limits = {"max_outbound_bytes": 1 << 20, "outbound_pause_bytes": 64 * 1024}
        with connection(host, **limits) as (conn, peer, _loop):
            frame = _big_frame(4000)
            while not conn.paused:
                conn.send_encoded(frame)
            # A ping sent while paused is not read (nor answered) ...
            peer.sendall(wire.encode(spb.Frame(ping=spb.Ping(nonce=7))))
            await asyncio.sleep(0.2)
            assert host.frames == []
            # ... until the peer reads enough that less than half the pause threshold is left.
            peer.setblocking(False)
            drained = 0
            deadline = time.monotonic() + 10
            while conn.paused:
                assert time.monotonic() < deadline
                with contextlib.suppress(BlockingIOError):
                    drained += len(peer.recv(1 << 20))
                await asyncio.sleep(0.001)
            assert conn.queued_bytes < 32 * 1024 and not conn.closed
            await until(lambda: len(host.frames) == 1)
            assert host.frames[0][1].ping.nonce == 7
            assert drained > 0

    run(body())


def test_connection_hands_at_most_256_frames_per_loop_turn(run) -> None:
    async def body() -> None:
        turns: list[int] = []
        counts: dict[Connection, int] = {}
        counting: set[Connection] = set()

        def on_frame(conn: Connection, frame: spb.Frame, fds: list[int]) -> None:
            counts[conn] = counts.get(conn, 0) + 1
            if conn not in counting:
                # Scheduled now, this runs before the connection's own continuation: it sees
                # how many frames of this connection the current loop turn handed.
                counting.add(conn)
                start = counts[conn] - 1

                def count() -> None:
                    turns.append(counts[conn] - start)
                    counting.discard(conn)

                asyncio.get_running_loop().call_soon(count)

        host = Host(on_frame)
        pings = b"".join(wire.encode(spb.Frame(ping=spb.Ping(nonce=i))) for i in range(1, 1001))
        assert len(pings) < 64 * 1024  # one read takes them all
        with connection(host) as (conn, a_peer, _), connection(host) as (other, b_peer, _):
            a_peer.sendall(pings)
            b_peer.sendall(pings)
            await until(lambda: len(host.frames) == 2000)
            # Never more than 256 frames in a row from one connection: the two interleave.
            runs: list[int] = []
            last = None
            for c, _frame in host.frames:
                if c is last:
                    runs[-1] += 1
                else:
                    runs.append(1)
                    last = c
            assert max(runs) <= FRAMES_PER_WAKEUP, runs
            assert len(runs) >= 2 * (1000 // FRAMES_PER_WAKEUP), runs
            assert [f.ping.nonce for c, f in host.frames if c is conn] == list(range(1, 1001))
            assert [f.ping.nonce for c, f in host.frames if c is other] == list(range(1, 1001))
            await until(lambda: sum(turns) == 2000)
            assert max(turns) == FRAMES_PER_WAKEUP, turns

    run(body())


def test_queued_frames_keep_their_order_and_fds_ride_with_their_own_frame(run) -> None:
    async def body() -> None:
        memfds = [create_memfd(f"delivered-{i}", 4096) for i in range(3)]
        inodes = [os.fstat(fd).st_ino for fd in memfds]
        try:
            host = Host()
            limits = {"max_outbound_bytes": 8 << 20, "outbound_pause_bytes": 4 << 20}
            with connection(host, **limits) as (conn, peer, _loop):
                # A big frame first fills the kernel's buffer, so what follows queues (small
                # frames coalesced, each fd-carrying frame starting a chunk of its own) and
                # leaves in partial sends as the peer reads.
                expected: list[tuple[str, int]] = []
                for _ in range(4):
                    conn.send_encoded(_big_frame(60_000))
                    expected.append(("error", 0))
                for i in range(3000):
                    if i % 1000 == 500:
                        fd = memfds[i // 1000]
                        conn.send(spb.Frame(fd_delivery=spb.FdDelivery(tag=i, space_id="sp")), [fd])
                        expected.append(("fd_delivery", i))
                    conn.send(spb.Frame(pong=spb.Pong(nonce=i)))
                    expected.append(("pong", i))
                assert conn.queued_bytes > 0
                decoder = wire.FrameDecoder(1 << 20)
                got: list[tuple[str, int]] = []
                received: list[int] = []
                peer.setblocking(False)
                deadline = time.monotonic() + 10
                while len(got) < len(expected):
                    assert time.monotonic() < deadline, (len(got), len(expected))
                    try:
                        data, fds, truncated = sys_sock.recv_with_fds(peer, 4096)
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
                        continue
                    assert not truncated and data
                    for frame, frame_fds in decoder.feed(data, fds):
                        kind = frame.WhichOneof("body") or ""
                        number = {"pong": frame.pong.nonce, "fd_delivery": frame.fd_delivery.tag}
                        got.append((kind, number.get(kind, 0)))
                        for fd in frame_fds:
                            received.append(os.fstat(fd).st_ino)
                            os.close(fd)
                assert got == expected
                assert received == inodes
                assert conn.queued_bytes == 0 and not conn.paused
                decoder.close()
        finally:
            for fd in memfds:
                os.close(fd)

    run(body())


def _fds_of(link: str) -> int:
    """How many of this process's fds are the memfd whose /proc link is `link`."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == link:
                count += 1
    return count


def test_connection_closes_the_fds_of_frames_it_never_handed(run) -> None:
    async def body() -> None:
        memfd = create_memfd("handed-or-closed", 4096)
        link = os.readlink(f"/proc/self/fd/{memfd}")
        try:

            def on_frame(conn: Connection, frame: spb.Frame, fds: list[int]) -> None:
                if len(host.frames) == 10:
                    conn.close("host hung up")

            host = Host(on_frame)
            # 300 pings and then an fd_offer, in one sendmsg carrying the fd: the fd_offer frame
            # is decoded (and owns the fd) but the host closes the connection before it is
            # handed on, so the connection must close it.
            data = b"".join(
                wire.encode(spb.Frame(ping=spb.Ping(nonce=i))) for i in range(1, 301)
            ) + wire.encode(spb.Frame(fd_offer=spb.FdOffer(tag=1)))
            with connection(host) as (conn, peer, _):
                assert sys_sock.send_with_fds(peer, data, [memfd]) == len(data)
                await until(lambda: conn.closed)
                assert conn.close_reason == "host hung up"
                assert len(host.frames) == 10
            assert _fds_of(link) == 1  # only ours
        finally:
            os.close(memfd)

    run(body())


def test_connection_closes_the_fds_of_frames_queued_when_paused_and_dropped(run) -> None:
    async def body() -> None:
        memfd = create_memfd("paused-then-dropped", 4096)
        link = os.readlink(f"/proc/self/fd/{memfd}")
        try:
            frame = _big_frame(4000)

            def on_frame(conn: Connection, f: spb.Frame, fds: list[int]) -> None:
                # Each ping is answered with a big frame the peer never reads.
                conn.send_encoded(frame)

            host = Host(on_frame)
            data = b"".join(
                wire.encode(spb.Frame(ping=spb.Ping(nonce=i))) for i in range(1, 301)
            ) + wire.encode(spb.Frame(fd_offer=spb.FdOffer(tag=1)))
            with connection(host, max_outbound_bytes=256 * 1024, outbound_pause_bytes=8192) as (
                conn,
                peer,
                _,
            ):
                assert sys_sock.send_with_fds(peer, data, [memfd]) == len(data)
                await until(lambda: conn.paused)
                handed = len(host.frames)
                assert handed < 300  # paused mid-batch: the rest (and the fd) wait
                await asyncio.sleep(0.1)
                assert len(host.frames) == handed
                assert _fds_of(link) == 2
                conn.close("shutdown")
            assert _fds_of(link) == 1
        finally:
            os.close(memfd)

    run(body())


# -- a real daemon under a flood of pings from a peer that never reads --------------------------

FLOODER = r"""
import json, select, socket, sys, time
from membroker import wire
from membroker.v1 import session_pb2 as spb

path, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
s.sendall(wire.encode(spb.Frame(hello=spb.Hello(protocol_version=1, client_name="flooder"))))
print(json.dumps({"ready": True}), flush=True)   # the Welcome is never read, nor anything after
batch = memoryview(b"".join(wire.encode(spb.Frame(ping=spb.Ping(nonce=i))) for i in range(1, 8192)))
s.setblocking(False)
sent = offset = 0
ended = ""
start = last_progress = time.monotonic()
while time.monotonic() - start < seconds:
    try:
        n = s.send(batch[offset:])
    except BlockingIOError:
        select.select([], [s], [], 0.05)
        continue
    except OSError as exc:
        ended = f"{type(exc).__name__}: {exc}"
        break
    sent += n
    offset = (offset + n) % len(batch)
    last_progress = time.monotonic()
print(json.dumps({"sent": sent, "stalled_s": time.monotonic() - last_progress, "ended": ended}),
      flush=True)
"""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _readline(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the flooder did not report in time"
    line = proc.stdout.readline()
    assert line, "the flooder exited without a report"
    result: dict[str, Any] = json.loads(line)
    return result


def test_a_peer_that_never_reads_costs_bounded_memory_and_no_one_else_waits(daemon) -> None:
    seconds = 5.0
    with membroker.connect("honest", daemon.runtime_dir) as honest:
        honest.ping()
        fds_before = daemon.open_fds()
        rss_before = _rss_kib(daemon.pid)
        flooder = subprocess.Popen(
            [sys.executable, "-c", FLOODER, str(daemon.runtime_dir / "session.sock"), str(seconds)],
            stdout=subprocess.PIPE,
            env=_env(),
        )
        try:
            assert _readline(flooder, 30)["ready"]
            rtts: list[float] = []
            rss_max = rss_before
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds - 0.5:
                rtts.append(honest.ping(timeout=5))
                rss_max = max(rss_max, _rss_kib(daemon.pid))
                time.sleep(0.05)
            report = _readline(flooder, 30)
            assert flooder.wait(10) == 0
        finally:
            if flooder.poll() is None:
                flooder.kill()
                flooder.wait(10)
            assert flooder.stdout is not None
            flooder.stdout.close()
        # The daemon stopped reading from the flooder (or dropped it): its sends went nowhere
        # for the last second at least, after a few MiB at most -- not the whole 5 s flood.
        assert report["ended"] or report["stalled_s"] >= 1.0, report
        assert report["sent"] < 16 * MiB, report
        assert (rss_max - rss_before) < 64 * 1024, (rss_before, rss_max)
        # Meanwhile the honest session was served promptly, every time.
        assert len(rtts) >= 20, rtts
        assert max(rtts) < 1.0, rtts
        # The flooder's connection is gone once it exited, its fds with it.
        deadline = time.monotonic() + 10
        while daemon.open_fds() > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.open_fds() <= fds_before
        assert honest.ping(timeout=5) < 1.0


# -- one daemon per runtime directory ------------------------------------------------------------


def _identity(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def _start(runtime_dir: Path, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs a daemon that is expected to refuse to start; it never gets to serve."""
    proc = subprocess.Popen(
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
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stale_socket(path: Path) -> tuple[int, int]:
    """A socket file nobody listens on: bound, then closed without unlink (a crashed daemon)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    return _identity(path)


def _stats(runtime_dir: Path) -> Any:
    with membroker.connect("probe", runtime_dir) as s:
        return s.stats()


def test_a_second_daemon_refuses_and_leaves_the_first_alone(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    first = Daemon(rt)
    try:
        sockets = {name: _identity(rt / name) for name in ("control.sock", "session.sock")}
        assert (rt / "membrokerd.lock").read_text() == f"{first.pid}\n"
        second = _start(rt)
        assert second.returncode == 1, second
        assert second.stderr.strip().splitlines() == [
            f"membrokerd: cannot start: another membrokerd (pid {first.pid}) serves {rt} "
            f"(it holds {rt / 'membrokerd.lock'})"
        ], second.stderr
        assert "ready" not in second.stdout
        # The first one is untouched: same socket files, same lock, still serving.
        assert {name: _identity(rt / name) for name in sockets} == sockets
        assert (rt / "membrokerd.lock").read_text() == f"{first.pid}\n"
        assert _stats(rt) is not None
    finally:
        assert first.stop() == 0, first.log()
    assert sorted(p.name for p in rt.iterdir()) == []


def test_a_server_answering_on_a_socket_path_is_never_replaced(tmp_path: Path) -> None:
    # No lock held (say, a membrokerd too old to take one, or anything else listening there).
    rt = tmp_path / "rt"
    rt.mkdir()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        squatter.bind(str(rt / "control.sock"))
        squatter.listen(1)
        before = _identity(rt / "control.sock")
        result = _start(rt)
        assert result.returncode == 1, result
        assert result.stderr.strip().splitlines() == [
            f"membrokerd: cannot start: {rt / 'control.sock'} is in use: a server answers "
            "there (another membrokerd?); not touching it"
        ], result.stderr
        assert _identity(rt / "control.sock") == before
        assert sorted(p.name for p in rt.iterdir()) == ["control.sock"]  # no lock left behind
    finally:
        squatter.close()


def test_a_file_that_is_not_a_socket_is_never_removed(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir()
    (rt / "session.sock").write_text("not a socket")
    result = _start(rt)
    assert result.returncode == 1, result
    assert "session.sock exists and is not a socket" in result.stderr
    assert (rt / "session.sock").read_text() == "not a socket"


def test_stale_sockets_are_replaced(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    first = Daemon(rt)
    assert first.stop() == 0, first.log()
    stale = {name: _stale_socket(rt / name) for name in ("control.sock", "session.sock")}
    with pytest.raises(ConnectionRefusedError):
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(str(rt / "session.sock"))
    second = Daemon(rt)
    try:
        for name, ident in stale.items():
            assert _identity(rt / name) != ident, name
            assert stat.S_ISSOCK(os.lstat(rt / name).st_mode)
        assert _stats(rt) is not None
    finally:
        assert second.stop() == 0, second.log()
    assert sorted(p.name for p in rt.iterdir()) == []


def test_a_killed_daemon_leaves_files_the_next_one_takes_over(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    first = Daemon(rt)
    left = {name: _identity(rt / name) for name in ("control.sock", "session.sock")}
    first.proc.kill()  # SIGKILL: no cleanup at all
    first.proc.wait(10)
    first.stop()
    assert (rt / "membrokerd.lock").read_text() == f"{first.pid}\n"  # its lock died with it
    second = Daemon(rt)
    try:
        assert (rt / "membrokerd.lock").read_text() == f"{second.pid}\n"
        for name, ident in left.items():
            assert _identity(rt / name) != ident, name
        assert _stats(rt) is not None
    finally:
        assert second.stop() == 0, second.log()
    assert sorted(p.name for p in rt.iterdir()) == []


def test_shutdown_removes_only_the_socket_files_it_bound(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    d = Daemon(rt)
    moved = tmp_path / "moved.sock"
    try:
        # Someone replaces session.sock while the daemon runs (by hand, or a tool gone wrong).
        os.rename(rt / "session.sock", moved)
        replacement = _stale_socket(rt / "session.sock")
    finally:
        assert d.stop() == 0, d.log()
    assert _identity(rt / "session.sock") == replacement  # not ours: left in place
    assert not (rt / "control.sock").exists()  # ours: removed
    assert moved.exists()  # ours under another name: the daemon does not chase it
    assert "no longer the socket this daemon bound" in d.log()


def test_a_failed_start_undoes_only_what_it_did(tmp_path: Path) -> None:
    # `make run` twice, or any other holder of the metrics port: the daemon gets as far as
    # binding its sockets, then must leave the runtime directory as it found it.
    rt = tmp_path / "rt"
    rt.mkdir()
    stale = _stale_socket(rt / "control.sock")
    port_holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        port_holder.bind(("127.0.0.1", 0))
        port_holder.listen(1)
        port = port_holder.getsockname()[1]
        result = _start(rt, "--metrics-address", f"127.0.0.1:{port}")
    finally:
        port_holder.close()
    assert result.returncode == 1, result
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("membrokerd: cannot start:") and "address already in use" in last, last
    # The stale control.sock was replaced by ours, and ours was removed: nothing is left.
    assert not (rt / "control.sock").exists()
    assert sorted(p.name for p in rt.iterdir()) == [], stale


# -- the runtime directory ------------------------------------------------------------------------


def test_runtime_dir_owned_by_another_uid_is_refused(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o755)
    os.chown(rt, NOBODY, NOBODY)
    result = _start(rt)
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        f"membrokerd: cannot start: runtime directory {rt} is owned by uid {NOBODY}, not by "
        f"this daemon's uid {os.geteuid()}: refusing to serve from it"
    ], result.stderr
    assert list(rt.iterdir()) == []


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_runtime_dir_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    rt = tmp_path / "rt"
    rt.mkdir()
    rt.chmod(mode)
    result = _start(rt)
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        f"membrokerd: cannot start: runtime directory {rt} is writable by group or others "
        f"(mode {mode:04o}) and not sticky: anyone could replace its sockets"
    ], result.stderr
    assert list(rt.iterdir()) == []


def test_a_sticky_shared_runtime_dir_is_accepted(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir()
    rt.chmod(0o1777)
    d = Daemon(rt)
    try:
        assert _stats(rt) is not None
    finally:
        assert d.stop() == 0, d.log()


def test_runtime_dir_modes_when_created(tmp_path: Path) -> None:
    # Anywhere but in a directory every user may write: 0755 (the socket modes are the gate).
    d = Daemon(tmp_path / "rt")
    try:
        assert stat.S_IMODE(os.stat(d.runtime_dir).st_mode) == 0o755
    finally:
        assert d.stop() == 0, d.log()
    # Directly in /tmp (the fallback /tmp/membroker-UID): 0700, nobody else may even look.
    rt = Path(tempfile.mkdtemp(prefix="membroker-hardening-", dir="/tmp"))
    rt.rmdir()
    try:
        in_tmp = Daemon(rt)
        try:
            st = os.stat(rt)
            assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, os.geteuid())
        finally:
            assert in_tmp.stop() == 0, in_tmp.log()
    finally:
        shutil.rmtree(rt, ignore_errors=True)
        (rt.parent / f"{rt.name}.log").unlink(missing_ok=True)


def test_the_loop_lag_probe_reports_how_late_the_loop_runs(tmp_path: Path) -> None:
    env = dict(_env(), MEMBROKER_LOOP_PROBE_MS="5")
    d = Daemon(tmp_path / "rt", env=env)
    try:
        time.sleep(0.5)
        samples = {}
        for line in d.scrape().splitlines():
            if line.startswith(
                ("membroker_event_loop_lag_seconds_count", "membroker_event_loop_lag_max")
            ):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        # About 100 periods of 5 ms in half a second; the loop is idle, so each is on time
        # within the scheduler's tolerance (no value asserted: only that it is measured).
        assert samples["membroker_event_loop_lag_seconds_count"] >= 20
        assert 0 <= samples["membroker_event_loop_lag_max_seconds"] < 5
    finally:
        assert d.stop() == 0
