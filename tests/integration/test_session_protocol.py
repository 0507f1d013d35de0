"""Adversarial session peers: every bad frame gets an error and a closed connection, the broker
keeps serving everyone else, and no fd leaks."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

import membroker
from membroker import wire
from membroker._sys import sock as sys_sock
from membroker.v1 import session_pb2 as spb


def _raw(daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(daemon.runtime_dir / "session.sock"))
    return s


def _hello(s: socket.socket, name: str = "raw") -> spb.Welcome:
    s.sendall(wire.encode(spb.Frame(hello=spb.Hello(protocol_version=1, client_name=name))))
    frame = _read_frame(s)
    assert frame.WhichOneof("body") == "welcome", frame
    return frame.welcome


def _read_frame(s: socket.socket) -> spb.Frame:
    decoder = wire.FrameDecoder()
    while True:
        data, fds, _ = sys_sock.recv_with_fds(s, 65536)
        for fd in fds:
            os.close(fd)
        assert data, "connection closed before a frame arrived"
        frames = decoder.feed(data, [])
        if frames:
            return frames[0][0]


def _closed_after_error(s: socket.socket) -> spb.Error:
    """Reads the Error frame, then expects EOF."""
    frame = _read_frame(s)
    assert frame.WhichOneof("body") == "error", frame
    s.settimeout(5)
    rest = b""
    while chunk := s.recv(4096):
        rest += chunk
    assert rest == b""
    s.close()
    return frame.error


def _memfd() -> int:
    return os.memfd_create("stray", os.MFD_CLOEXEC)


def _wait_fds(daemon, expected: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and daemon.open_fds() != expected:
        time.sleep(0.02)
    return daemon.open_fds()


BAD_AFTER_HELLO = {
    "oversized": (struct.pack("<I", 10 << 20), (), "exceeds the limit"),
    "garbage": (struct.pack("<I", 6) + b"\xff\xff\xff\xff\xff\xff", (), "undecodable"),
    "empty frame": (struct.pack("<I", 0), (), "no known body"),
    "ping with an fd": (wire.encode(spb.Frame(ping=spb.Ping(nonce=1))), ("fd",), "unexpected fd"),
    "fd_offer without fd": (wire.encode(spb.Frame(fd_offer=spb.FdOffer(tag=1))), (), "needs 1 fd"),
    "five fds": (wire.encode(spb.Frame(fd_offer=spb.FdOffer(tag=1))), ("fd",) * 5, "truncated"),
    "broker-only frame": (
        wire.encode(spb.Frame(revoke=spb.Revoke(space_id="x", seq=1))),
        (),
        "may not send revoke",
    ),
    "ack never asked for": (
        wire.encode(spb.Frame(revoke_ack=spb.RevokeAck(space_id="x", seq=7))),
        (),
        "was not asked",
    ),
    "second hello": (
        wire.encode(spb.Frame(hello=spb.Hello(protocol_version=1, client_name="again"))),
        (),
        "may not send hello",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_AFTER_HELLO))
def test_bad_frame_gets_error_and_close_and_broker_keeps_serving(daemon, case):
    data, fd_kinds, message = BAD_AFTER_HELLO[case]
    with membroker.connect("bystander", daemon.runtime_dir) as bystander:
        space = bystander.create_space(1 << 20)
        bystander.ping()
        baseline = daemon.open_fds()
        s = _raw(daemon)
        _hello(s)
        fds = [_memfd() for _ in fd_kinds]
        try:
            sys_sock.send_with_fds(s, data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        error = _closed_after_error(s)
        assert message in error.message, error
        # The broker is intact: the other session still works, nothing leaked.
        assert bystander.ping() < 5
        assert bystander.get_space(space.space_id).size == 1 << 20
        assert _wait_fds(daemon, baseline) == baseline
        space.close()


def test_first_frame_must_be_hello(daemon):
    s = _raw(daemon)
    s.sendall(wire.encode(spb.Frame(ping=spb.Ping(nonce=1))))
    assert "must be hello" in _closed_after_error(s).message


@pytest.mark.parametrize("name", ["", "-x", "a" * 65, "sp ace", "é"])
def test_bad_client_names_are_refused(daemon, name):
    s = _raw(daemon)
    s.sendall(wire.encode(spb.Frame(hello=spb.Hello(protocol_version=1, client_name=name))))
    assert "client name" in _closed_after_error(s).message


def test_unsupported_protocol_version_is_refused(daemon):
    s = _raw(daemon)
    s.sendall(wire.encode(spb.Frame(hello=spb.Hello(protocol_version=99, client_name="x"))))
    assert "protocol version 99" in _closed_after_error(s).message


def test_name_in_use_is_refused_with_the_holder(daemon):
    with (
        membroker.connect("backend", daemon.runtime_dir),
        pytest.raises(membroker.ConnectError, match=f"in use by the session of pid {os.getpid()}"),
    ):
        membroker.connect("backend", daemon.runtime_dir)


@pytest.mark.parametrize("cut", [1, 3, 4, 9])
def test_disconnect_mid_frame_releases_everything(daemon, cut):
    with membroker.connect("bystander", daemon.runtime_dir) as bystander:
        bystander.ping()
        baseline = daemon.open_fds()
        s = _raw(daemon)
        _hello(s)
        frame = wire.encode(spb.Frame(fd_offer=spb.FdOffer(tag=1)))
        fd = _memfd()
        sys_sock.send_with_fds(s, frame[:cut], [fd])
        os.close(fd)
        s.close()
        assert _wait_fds(daemon, baseline) == baseline
        assert [x.client for x in bystander.list_sessions()] == ["bystander"]


def test_frame_split_byte_by_byte_is_reassembled(daemon):
    s = _raw(daemon)
    _hello(s)
    frame = wire.encode(spb.Frame(ping=spb.Ping(nonce=42)))
    for i in range(len(frame)):
        s.send(frame[i : i + 1])
        time.sleep(0.001)
    reply = _read_frame(s)
    assert reply.pong.nonce == 42
    s.close()


def test_offered_fds_are_limited_and_released(daemon):
    with membroker.connect("bystander", daemon.runtime_dir) as bystander:
        bystander.ping()
        baseline = daemon.open_fds()
        s = _raw(daemon)
        _hello(s)
        for tag in range(1, 9):
            fd = _memfd()
            sys_sock.send_with_fds(s, wire.encode(spb.Frame(fd_offer=spb.FdOffer(tag=tag))), [fd])
            os.close(fd)
        fd = _memfd()
        sys_sock.send_with_fds(s, wire.encode(spb.Frame(fd_offer=spb.FdOffer(tag=99))), [fd])
        os.close(fd)
        assert "max_offered_fds" in _closed_after_error(s).message
        assert _wait_fds(daemon, baseline) == baseline


@pytest.mark.parametrize("how", ["fork", "scm_rights"])
def test_a_session_handed_to_another_process_is_cut_off(daemon, how):
    """The broker verifies the memory of the process that connected; a session passed on to
    another process (a decoy says Hello, the real user gets the socket) is refused at the new
    process's first frame, and the decoy can go on using nothing of it."""
    s = _raw(daemon)
    _hello(s, "decoy")
    s.sendall(wire.encode(spb.Frame(ping=spb.Ping(nonce=1))))
    assert _read_frame(s).pong.nonce == 1  # the process that connected: served
    if how == "scm_rights":
        parent_end, child_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the other process: a Ping on the session it did not open
        code = 1
        try:
            if how == "scm_rights":
                parent_end.close()
                _, fds, _ = sys_sock.recv_with_fds(child_end, 16)
                theirs = socket.socket(fileno=fds[0])
                s.close()
            else:
                theirs = s
            theirs.sendall(wire.encode(spb.Frame(ping=spb.Ping(nonce=2))))
            code = 0
        finally:
            os._exit(code)
    if how == "scm_rights":
        child_end.close()
        socket.send_fds(parent_end, [b"s"], [s.fileno()])
        parent_end.close()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    error = _closed_after_error(s)
    assert error.code == 7
    assert f"bytes sent by pid {pid} on the session of pid {os.getpid()}" in error.message
