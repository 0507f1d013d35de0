"""SCM_RIGHTS fd passing, MSG_CTRUNC, peer credentials and pidfds over real Unix sockets."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from membroker._sys import (
    MAX_FDS_PER_FRAME,
    PAGE_SIZE,
    Mapping,
    PeerCred,
    create_memfd,
    describe_fd,
    open_fd_count,
    peer_credentials,
    peer_pidfd,
    pidfd_is_alive,
    pidfd_open,
    pidfd_send_signal,
    recv_with_fds,
    send_with_fds,
)
from membroker._sys.mman import PROT_READ, PROT_WRITE


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _is_cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def test_fds_pass_and_are_usable(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    memfd = create_memfd("passed", PAGE_SIZE)
    try:
        assert send_with_fds(a, b"frame", [w, memfd]) == 5
        data, fds, truncated = recv_with_fds(b, 64)
        try:
            assert (data, len(fds), truncated) == (b"frame", 2, False)
            assert all(_is_cloexec(fd) for fd in fds)
            os.write(fds[0], b"through the passed pipe")
            assert os.read(r, 64) == b"through the passed pipe"
            assert describe_fd(fds[1]).ino == os.fstat(memfd).st_ino
            with Mapping.map_shared(fds[1], PAGE_SIZE, PROT_READ | PROT_WRITE) as m:
                m.write(0, b"shared")
            assert os.pread(memfd, 6, 0) == b"shared"
        finally:
            _close(fds)
    finally:
        _close([r, w, memfd])


def test_plain_data_has_no_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    assert send_with_fds(a, b"no fds") == 6
    assert recv_with_fds(b, 64) == (b"no fds", [], False)
    a.close()
    assert recv_with_fds(b, 64) == (b"", [], False)  # end of stream


@pytest.mark.parametrize(("sent", "maxfds"), [(4, 2), (2, 1), (3, 0), (MAX_FDS_PER_FRAME + 1, 4)])
def test_ctrunc_is_reported_and_delivered_fds_returned(
    pair: tuple[socket.socket, socket.socket], sent: int, maxfds: int
) -> None:
    a, b = pair
    before = open_fd_count(os.getpid())
    r, w = os.pipe()
    try:
        send_with_fds(a, b"too many", [w] * sent)
        data, fds, truncated = recv_with_fds(b, 64, maxfds=maxfds)
        assert data == b"too many"
        assert truncated is True
        # exactly the fds that fit arrived (CMSG_SPACE padding must not admit an extra one)
        assert len(fds) == maxfds
        _close(fds)
    finally:
        _close([r, w])
    # the fds that did not fit were dropped by the kernel, never installed here
    assert open_fd_count(os.getpid()) == before


def test_send_with_fds_rejects_bad_input(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with pytest.raises(ValueError, match="at least one byte"):
        send_with_fds(a, b"", [0])
    with pytest.raises(ValueError, match="negative"):
        send_with_fds(a, b"x", [-1])
    with pytest.raises(ValueError, match="253"):
        send_with_fds(a, b"x", [0] * 254)
    with pytest.raises(ValueError):
        recv_with_fds(b, 16, maxfds=-1)
    with pytest.raises(OSError) as exc:
        send_with_fds(a, b"x", [12345])  # not an open fd
    assert exc.value.errno == errno.EBADF


def test_send_to_closed_peer_is_epipe_not_sigpipe(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    b.close()
    with pytest.raises(BrokenPipeError):
        send_with_fds(a, b"x", [a.fileno()])


def test_partial_send_carries_fds_with_the_first_chunk(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = bytes(range(256)) * 4096  # 1 MiB, far more than the socket buffers
    r, w = os.pipe()
    received = bytearray()
    fds: list[int] = []
    try:
        sent = send_with_fds(a, payload, [w])
        assert 0 < sent < len(payload)
        while len(received) < len(payload):
            data, got, truncated = recv_with_fds(b, 1 << 16)
            assert not truncated
            fds.extend(got)
            received += data
            if sent < len(payload):
                try:
                    sent += a.send(payload[sent:])  # the rest, without the fds
                except BlockingIOError:
                    pass
        assert bytes(received) == payload
        assert len(fds) == 1
        assert os.fstat(fds[0]).st_ino == os.fstat(w).st_ino
    finally:
        _close([*fds, r, w])


def test_peer_credentials_of_socketpair(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    assert peer_credentials(a) == PeerCred(
        pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), groups=frozenset(os.getgroups())
    )
    assert os.getgid() in peer_credentials(a).groups


def test_peer_cred_always_includes_the_gid() -> None:
    assert PeerCred(pid=1, uid=2, gid=3).groups == frozenset({3})
    assert PeerCred(pid=1, uid=2, gid=3, groups=frozenset({7})).groups == frozenset({3, 7})


def _groups_of_a_child_that(groups: list[int], later: list[int] | None = None) -> PeerCred:
    """Forks a child that calls setgroups(groups), connects, then (if `later`) setgroups(later)
    and says so; returns what peer_credentials() of the accepted socket says."""
    if os.getuid() != 0:
        pytest.skip("setgroups needs CAP_SETGID")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0membroker-groups-{os.getpid()}-{time.monotonic_ns()}"
    listener.bind(name)
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            listener.close()
            os.setgroups(groups)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(name)
            if later is not None:
                os.setgroups(later)
            s.sendall(b"k")
            s.recv(1)
            code = 0
        finally:
            os._exit(code)
    try:
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(1) == b"k"  # the child is past its setgroups calls
            cred = peer_credentials(conn)
            conn.sendall(b"k")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
        return cred
    finally:
        listener.close()
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_peer_groups_are_the_supplementary_groups_at_connect() -> None:
    cred = _groups_of_a_child_that([4242, 4343, 65534])
    assert cred.groups == frozenset({4242, 4343, 65534, os.getgid()})


def test_peer_groups_are_captured_at_connect_not_read_later() -> None:
    # The kernel snapshots the credentials at connect(); a later setgroups() of the peer (or a
    # pid reused by another process) cannot change what the broker saw.
    cred = _groups_of_a_child_that([4242], later=[4343, 4444])
    assert cred.groups == frozenset({4242, os.getgid()})


def test_peer_groups_more_than_the_first_buffer_holds() -> None:
    # 1000 groups: the first getsockopt answers ERANGE with the size needed, the retry fits
    # (and Python's own socket.getsockopt could not read them at all: buflen <= 1024 bytes).
    many = list(range(10_000, 11_000))
    cred = _groups_of_a_child_that(many)
    assert cred.groups == frozenset([*many, os.getgid()])


def test_peer_groups_of_a_peer_with_none() -> None:
    cred = _groups_of_a_child_that([])
    assert cred.groups == frozenset({os.getgid()})


def test_peer_pidfd_and_sigkill_of_a_connected_child() -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0membroker-test-{os.getpid()}-{time.monotonic_ns()}"
    listener.bind(name)
    listener.listen(1)
    pid = os.fork()
    if pid == 0:  # the peer: connect and wait to be killed
        try:
            listener.close()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(name)
            s.recv(1)
            time.sleep(30)
        finally:
            os._exit(3)
    pidfd = -1
    reaped = False
    try:
        conn, _ = listener.accept()
        with conn:
            assert peer_credentials(conn) == PeerCred(
                pid=pid, uid=os.getuid(), gid=os.getgid(), groups=frozenset(os.getgroups())
            )
            pidfd = peer_pidfd(conn)
            assert _is_cloexec(pidfd)
            assert pidfd_is_alive(pidfd) is True
            pidfd_send_signal(pidfd, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            reaped = True
            assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
            assert pidfd_is_alive(pidfd) is False
            with pytest.raises(ProcessLookupError):
                pidfd_send_signal(pidfd, signal.SIGKILL)  # reaped: ESRCH, never a recycled pid
    finally:
        listener.close()
        if pidfd >= 0:
            os.close(pidfd)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_pidfd_open_and_liveness() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    pidfd = pidfd_open(pid)
    try:
        deadline = time.monotonic() + 5
        while pidfd_is_alive(pidfd) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert pidfd_is_alive(pidfd) is False  # exited, not yet reaped
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 7
    finally:
        os.close(pidfd)
    own = pidfd_open(os.getpid())
    try:
        assert pidfd_is_alive(own) is True
    finally:
        os.close(own)
    with pytest.raises(ProcessLookupError):
        pidfd_open(pid)  # reaped
    with pytest.raises(OSError) as exc:
        pidfd_is_alive(own)  # closed fd
    assert exc.value.errno == errno.EBADF


def test_no_fd_leak_over_many_transfers(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    before = open_fd_count(os.getpid())
    memfd = create_memfd("loop", PAGE_SIZE)
    for _ in range(200):
        send_with_fds(a, b"f", [memfd] * MAX_FDS_PER_FRAME)
        _, fds, truncated = recv_with_fds(b, 16)
        assert len(fds) == MAX_FDS_PER_FRAME and not truncated
        _close(fds)
    os.close(memfd)
    assert open_fd_count(os.getpid()) == before
