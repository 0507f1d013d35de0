"""A session's call channel (CallChannel frames): the SDK's calls are answered there and read by
the calling thread; a raw peer's channel carries calls and nothing else; a channel that is not a
Unix stream socket made by the session's own process is refused; it ends with its session."""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from typing import Any

import pytest

import membroker
from membroker import wire
from membroker._sys import sock as sys_sock
from membroker.errors import BrokerError
from membroker.v1 import broker_pb2 as pb
from membroker.v1 import session_pb2 as spb
from tests.conftest import Daemon, daemon_and_clients, stop_process
from tests.integration.test_session_calls import Raw

PAGE = 4096
MiB = 1 << 20


class Channel:
    """The raw peer's end of a call channel."""

    def __init__(self, raw: Raw, *, passcred: bool = True) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if passcred:
            sys_sock.pass_credentials(self.sock)
        self.sock.settimeout(10)
        send_frame_with_fd(raw, spb.Frame(call_channel=spb.CallChannel()), theirs.fileno())
        theirs.close()
        self.decoder = wire.FrameDecoder()
        self.frames: list[spb.Frame] = []

    def send(self, frame: spb.Frame) -> None:
        self.sock.sendall(wire.encode(frame))

    def call(self, call_id: int, method: str, request: Any) -> None:
        body = request.SerializeToString()
        self.send(spb.Frame(call=spb.Call(id=call_id, method=method, body=body)))

    def next(self) -> spb.Frame:
        while not self.frames:
            data = self.sock.recv(1 << 17)
            if not data:
                raise EOFError("call channel closed")
            self.frames += [frame for frame, _ in self.decoder.feed(data, [])]
        return self.frames.pop(0)

    def closed_after_error(self) -> spb.Error:
        frame = self.next()
        assert frame.WhichOneof("body") == "error", frame
        with pytest.raises(EOFError):
            self.next()
        return frame.error


def send_frame_with_fd(raw: Raw, frame: spb.Frame, fd: int) -> None:
    data = wire.encode(frame)
    fds = array.array("i", [fd]).tobytes()
    raw.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def test_the_sdk_reads_its_answers_on_its_call_channel(daemon: Daemon) -> None:
    """Calls of one thread at a time travel on the channel (answered there); a second thread
    calling meanwhile goes through the session socket; both get their own answers."""
    with membroker.connect("vmm", daemon.runtime_dir) as owner:
        space = owner.create_space(MiB)
        space.share(0, MiB)
        before = owner.calls_on_channel
        assert before >= 2  # CreateSpace and SetAttributes
        errors: list[BaseException] = []

        def grant_many(client: str) -> None:
            try:
                for i in range(50):
                    space.grant(client, i * PAGE, PAGE)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=grant_many, args=(f"c{i}",)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        grants = space.grants()
        assert sorted({c for c, _ in grants}) == ["c0", "c1", "c2"] and len(grants) == 3
        # Some on the channel, the rest (a thread that found it busy) on the session socket.
        assert before < owner.calls_on_channel < before + 150 + 1


def test_a_call_given_up_on_the_channel_leaves_it_usable(tmp_path: Any) -> None:
    """A revoke waits for a stopped client; the owner's call gives up after 0.3 s (a
    CallCancelled on the channel: the revocation goes on, to the fencing, with no answer).
    The channel serves the next calls."""
    with (
        daemon_and_clients(tmp_path, 1500, 0) as (d, start),
        membroker.connect("vmm", d.runtime_dir) as owner,
    ):
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("stuck", 0, PAGE)
        stuck = start("stuck")
        stuck.ok("attach_va", space=space.space_id)
        stop_process(stuck.pid)
        request = pb.RevokeRequest(
            space_id=space.space_id, client="stuck", range=spb.Range(offset=0, length=PAGE)
        )
        on_channel = owner.calls_on_channel
        with pytest.raises(BrokerError) as caught:
            owner.call("Revoke", request, timeout=0.3)
        assert "DEADLINE_EXCEEDED" in str(caught.value.code)
        time.sleep(1.5)  # past the revoke deadline
        assert owner.stats().fenced_total == 1
        assert space.grants() == []
        assert owner.calls_on_channel == on_channel + 2  # Stats and ListGrants: answered


def test_a_raw_call_channel_carries_calls_and_nothing_else(daemon: Daemon) -> None:
    raw = Raw(daemon.runtime_dir, "raw-chan")
    chan = Channel(raw)
    chan.call(5, "GetStats", pb.GetStatsRequest())
    answer = chan.next()
    assert answer.WhichOneof("body") == "call_result" and answer.call_result.id == 5
    assert answer.call_result.code == 0
    chan.call(6, "NoSuchMethod", pb.GetStatsRequest())
    missing = chan.next().call_result
    assert (missing.id, missing.code) == (6, 12)
    chan.send(spb.Frame(call_cancelled=spb.CallCancelled(id=99)))  # none such: ignored
    chan.send(spb.Frame(ping=spb.Ping(nonce=1)))
    error = chan.closed_after_error()
    assert "only call and call_cancelled travel on a call channel, not ping" in error.message
    # The session itself goes on, and may open another channel.
    raw.call(7, "GetStats", pb.GetStatsRequest())
    assert raw.result().code == 0
    again = Channel(raw)
    again.call(8, "GetStats", pb.GetStatsRequest())
    assert again.next().call_result.id == 8
    # A second one while it is open is a protocol error of the session.
    Channel(raw)
    assert "has a call channel already" in raw.closed_after_error().message
    # ... which closes the open channel with it.
    with pytest.raises(EOFError):
        again.next()


def test_an_fd_on_the_channel_closes_it(daemon: Daemon) -> None:
    raw = Raw(daemon.runtime_dir, "raw-fd")
    chan = Channel(raw)
    r, w = os.pipe()
    try:
        data = wire.encode(spb.Frame(call=spb.Call(id=1, method="GetStats", body=b"")))
        chan.sock.sendmsg(
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
        )
    finally:
        os.close(r)
        os.close(w)
    assert "fd" in chan.closed_after_error().message
    raw.call(2, "GetStats", pb.GetStatsRequest())
    assert raw.result().code == 0


@pytest.mark.parametrize("kind", ["pipe", "datagram", "someone_elses", "no_credentials"])
def test_a_channel_that_is_not_the_sessions_own_stream_socket_is_refused(
    daemon: Daemon, kind: str
) -> None:
    raw = Raw(daemon.runtime_dir, f"raw-{kind.replace('_', '-')}")
    frame = spb.Frame(call_channel=spb.CallChannel())
    if kind == "no_credentials":
        # Bytes sent before the broker took the channel, without SO_PASSCRED on this end,
        # carry no sender: refused like bytes of another process (the channel only).
        chan = Channel(raw, passcred=False)
        chan.call(1, "GetStats", pb.GetStatsRequest())
        assert "bytes sent by pid 0" in chan.closed_after_error().message
        raw.call(2, "GetStats", pb.GetStatsRequest())
        assert raw.result().code == 0
        return
    if kind == "pipe":
        r, w = os.pipe()
        send_frame_with_fd(raw, frame, r)
        os.close(r)
        os.close(w)
        expected = "call_channel: fd is not a socket"
    elif kind == "datagram":
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        send_frame_with_fd(raw, frame, a.fileno())
        a.close()
        b.close()
        expected = "is a AF_UNIX SOCK_DGRAM socket, not a Unix stream socket"
    else:
        # Connected to the daemon's own control socket: the other end is the daemon's.
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.connect(str(daemon.runtime_dir / "control.sock"))
        send_frame_with_fd(raw, frame, other.fileno())
        other.close()
        expected = "the call channel's other end was made by pid "
    assert expected in raw.closed_after_error().message
    with membroker.connect("check", daemon.runtime_dir) as check:
        assert check.ping() > 0  # the daemon serves on, and nothing leaked into it


def test_the_channel_ends_with_its_session(daemon: Daemon) -> None:
    raw = Raw(daemon.runtime_dir, "raw-end")
    chan = Channel(raw)
    chan.call(1, "GetStats", pb.GetStatsRequest())
    assert chan.next().call_result.id == 1
    raw.sock.close()
    with pytest.raises(EOFError):
        chan.next()


def test_calls_in_flight_on_the_channel_count_against_the_session(tmp_path: Any) -> None:
    """64 revokes of a stopped client in flight on the channel: the 65th is refused and closes
    the channel, and the 64 are cancelled with it (as a gRPC call whose caller hung up: the
    revocations go on); the session calls again."""
    with daemon_and_clients(tmp_path, 5000, 0) as (d, start):
        raw = Raw(d.runtime_dir, "raw-flood")
        raw.call(1, "CreateSpace", pb.CreateSpaceRequest(size=MiB, backing=pb.BACKING_MEMFD))
        space = pb.CreateSpaceResponse.FromString(raw.result().body).space
        share = pb.SetAttributesRequest(
            space_id=space.space_id,
            range=spb.Range(offset=0, length=MiB),
            attribute=pb.ATTRIBUTE_SHARED,
        )
        raw.call(2, "SetAttributes", share)
        assert raw.result().code == 0
        grant = pb.GrantRequest(
            space_id=space.space_id,
            client="stuck",
            range=spb.Range(offset=0, length=MiB),
            access=spb.ACCESS_RW,
        )
        raw.call(3, "Grant", grant)
        assert raw.result().code == 0
        stuck = start("stuck")
        stuck.ok("attach_va", space=space.space_id)
        stop_process(stuck.pid)
        chan = Channel(raw)
        for i in range(65):
            offset = i * PAGE
            chan.call(
                100 + i,
                "Revoke",
                pb.RevokeRequest(
                    space_id=space.space_id,
                    client="stuck",
                    range=spb.Range(offset=offset, length=PAGE),
                ),
            )
        assert "more than 64 calls in flight" in chan.closed_after_error().message
        # Its 64 calls went with it (their caller is gone): the session may call again.
        raw.call(4, "GetStats", pb.GetStatsRequest())
        assert raw.result().code == 0
