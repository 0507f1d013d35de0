"""Control calls on the session socket (Call / CallResult frames), tried by a raw peer: bad ids,
unknown methods, garbage bodies, a flood of calls in flight, a caller that hangs up mid-call.
The SDK's own use of them (its default) is covered by every other integration test."""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import pytest

import membroker
from membroker import wire
from membroker._sys import sock as sys_sock
from membroker.v1 import broker_pb2 as pb
from membroker.v1 import session_pb2 as spb
from tests.conftest import Daemon, daemon_and_clients, stop_process

PAGE = 4096
MiB = 1 << 20


class Raw:
    """A session peer that speaks the frames itself (no SDK)."""

    def __init__(self, runtime_dir: Any, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(runtime_dir / "session.sock"))
        self.decoder = wire.FrameDecoder()
        self.frames: list[spb.Frame] = []
        self.send(spb.Frame(hello=spb.Hello(protocol_version=1, client_name=name)))
        assert self.next().WhichOneof("body") == "welcome"

    def send(self, frame: spb.Frame) -> None:
        self.sock.sendall(wire.encode(frame))

    def next(self) -> spb.Frame:
        while not self.frames:
            data, fds, _ = sys_sock.recv_with_fds(self.sock, 1 << 17)
            if not data:
                raise EOFError("connection closed")
            for frame, frame_fds in self.decoder.feed(data, fds):
                for fd in frame_fds:
                    os.close(fd)  # a space's fd (FdDelivery): not needed here
                self.frames.append(frame)
        return self.frames.pop(0)

    def call(self, call_id: int, method: str, request: Any) -> None:
        self.send(
            spb.Frame(call=spb.Call(id=call_id, method=method, body=request.SerializeToString()))
        )

    def result(self) -> spb.CallResult:
        while True:
            frame = self.next()
            if frame.WhichOneof("body") == "call_result":
                return frame.call_result

    def closed_after_error(self) -> spb.Error:
        while True:
            frame = self.next()
            if frame.WhichOneof("body") == "error":
                break
        with pytest.raises(EOFError):
            while True:
                self.next()
        return frame.error


def test_calls_on_the_session_are_answered_like_grpc_and_bad_ones_refused(daemon: Daemon) -> None:
    raw = Raw(daemon.runtime_dir, "raw-owner")
    raw.call(7, "CreateSpace", pb.CreateSpaceRequest(size=MiB, name="g", backing=pb.BACKING_MEMFD))
    created = raw.result()
    assert created.id == 7 and created.code == 0, created
    space = pb.CreateSpaceResponse.FromString(created.body).space
    raw.call(8, "NoSuchMethod", pb.GetStatsRequest())
    missing = raw.result()
    assert (missing.id, missing.code) == (8, 12) and "NoSuchMethod" in missing.message
    raw.send(spb.Frame(call=spb.Call(id=9, method="Grant", body=b"\xff\xff\xff")))
    garbage = raw.result()
    assert (garbage.id, garbage.code) == (9, 3) and "GrantRequest" in garbage.message
    # Validation and policy are the gRPC method's own: a grant of a private range is refused.
    raw.call(
        10,
        "Grant",
        pb.GrantRequest(
            space_id=space.space_id,
            client="x",
            range=spb.Range(offset=0, length=PAGE),
            access=spb.ACCESS_RW,
        ),
    )
    refused = raw.result()
    assert refused.code == 9 and "not shared" in refused.message, refused  # FAILED_PRECONDITION
    # Someone else's space: PERMISSION_DENIED, as over gRPC.
    other = membroker.connect("other", str(daemon.runtime_dir))
    with pytest.raises(membroker.PermissionDenied):
        other.call(
            "SetAttributes",
            pb.SetAttributesRequest(
                space_id=space.space_id,
                range=spb.Range(offset=0, length=PAGE),
                attribute=pb.ATTRIBUTE_SHARED,
            ),
        )
    other.close()
    # An id of zero is a protocol error: the connection is closed, the broker serves on.
    raw.call(0, "GetStats", pb.GetStatsRequest())
    assert "zero" in raw.closed_after_error().message
    with membroker.connect("check", str(daemon.runtime_dir)) as check:
        assert check.get_space(space.space_id).size == MiB


def test_a_flood_of_calls_in_flight_is_cut_off_and_a_hung_up_caller_changes_nothing(
    tmp_path: Any,
) -> None:
    with daemon_and_clients(tmp_path, 1500, 3600) as (d, start):
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("c", 0, 64 * PAGE)
        c = start("c")
        c.ok("attach_va", space=space.space_id)
        stop_process(c.pid)  # every revoke below now waits for its deadline
        owner.close()  # its name is free for the raw peer (same uid)
        raw = Raw(d.runtime_dir, "vmm")
        for i in range(65):
            if i == 64:
                time.sleep(0.3)  # the 64 have started (queued behind the first): one more
            raw.call(
                i + 1,
                "Revoke",
                pb.RevokeRequest(
                    space_id=space.space_id,
                    client="c",
                    range=spb.Range(offset=i * PAGE, length=PAGE),
                ),
            )
        # Over 64 calls in flight: cut off (the connection), while the ones already running
        # run to their end without their caller.
        error = raw.closed_after_error()
        assert error.code == 8 and "64 calls in flight" in error.message, error
        with membroker.connect("vmm", str(d.runtime_dir)) as again:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and again.stats().fenced_total < 1:
                time.sleep(0.05)
            # The first revocation fenced the frozen client at its deadline, with nobody waiting
            # for it any more; its report is kept, and says so.
            reports = again.list_revocations(space.space_id)
            first = next(r for r in reports if r.clients)
            assert first.cause == "revoke" and first.clients[0].outcome == "fenced", first
            assert first.caller_gone
            assert again.stats().fenced_total == 1
        os.kill(c.pid, signal.SIGCONT)


def test_raw_sealed_frames_that_lie_are_refused(daemon: Daemon) -> None:
    """A peer without the SDK: a Sealed frame for a space it did not attach sealed, and one
    whose fd is a memfd instead of a userfaultfd (refused, and the peer fenced)."""
    with membroker.connect("vmm", str(daemon.runtime_dir)) as owner:
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("raw", 0, PAGE)
        space_id = space.space_id
        space.close()  # this process must not hold the space by right (owner, fd) for sealing
    sealed = spb.Frame(sealed=spb.Sealed(space_id=space_id, address=1 << 30, length=MiB))
    # Without its fd, or for a space not attached in sealed mode: a protocol error each, the
    # connection closed (and the fd it carried closed by the broker).
    raw = Raw(daemon.runtime_dir, "raw")
    raw.send(sealed)
    assert "sealed frame needs 1 fd" in raw.closed_after_error().message
    raw = Raw(daemon.runtime_dir, "raw")
    stray = os.memfd_create("stray")
    try:
        sys_sock.send_with_fds(raw.sock, wire.encode(sealed), [stray])
    finally:
        os.close(stray)
    assert "did not attach in sealed mode" in raw.closed_after_error().message
    # Attached sealed, then a Sealed frame carrying a memfd: refused, and fenced.
    raw = Raw(daemon.runtime_dir, "raw")
    raw.call(
        1,
        "Attach",
        pb.AttachRequest(space_id=space_id, kind=pb.ATTACH_KIND_VA, va_mode=pb.VA_MODE_SEALED),
    )
    attached = raw.result()
    assert attached.code == 0, attached
    assert pb.AttachResponse.FromString(attached.body).va_mode == pb.VA_MODE_SEALED
    memfd = os.memfd_create("not-a-uffd")
    try:
        sys_sock.send_with_fds(raw.sock, wire.encode(sealed), [memfd])
    finally:
        os.close(memfd)
    while (frame := raw.next()).WhichOneof("body") != "sealed_result":
        pass
    assert "not a userfaultfd" in frame.sealed_result.error, frame
    with membroker.connect("vmm", str(daemon.runtime_dir)) as owner:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and owner.stats().fenced_total < 1:
            time.sleep(0.05)
        assert owner.stats().fenced_total == 1
    assert "sealed mapping refused" in daemon.log()


def test_withdrawn_ranges_in_an_ack_must_be_held(daemon: Daemon) -> None:
    """What a client says it gave up goes into the owner's report: a raw peer that lists a
    range it does not hold is refused (protocol error); one it holds is reported."""
    import threading

    with membroker.connect("vmm", str(daemon.runtime_dir)) as owner:
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("raw", 0, 2 * PAGE)
        space.grant("raw", 8 * PAGE, PAGE)
        sid = space.space_id

        def revoke_with(withdrawn: list[tuple[int, int]]) -> tuple[Raw, Any]:
            raw = Raw(daemon.runtime_dir, "raw")
            raw.call(1, "Attach", pb.AttachRequest(space_id=sid, kind=pb.ATTACH_KIND_FD))
            assert raw.result().code == 0
            reports: list[Any] = []
            t = threading.Thread(target=lambda: reports.append(space.revoke("raw", 0, PAGE)))
            t.start()
            while (frame := raw.next()).WhichOneof("body") != "revoke":
                pass
            ack = spb.RevokeAck(space_id=sid, seq=frame.revoke.seq)
            for offset, length in withdrawn:
                ack.withdrawn.add(offset=offset, length=length)
            raw.send(spb.Frame(revoke_ack=ack))
            t.join(30)
            return raw, reports[0]

        # 16 pages in: never granted. Refused, and the connection closed.
        raw, report = revoke_with([(16 * PAGE, PAGE)])
        error = raw.closed_after_error()
        assert "does not hold" in error.message and "0x10000+0x1000" in error.message, error
        assert report.clients[0].withdrawn == ()
        # Page 8: held and not revoked. Reported as given up. (The refused session above was
        # judged like any that ends mid-revocation; its grants are given again.)
        space.grant("raw", 0, 2 * PAGE)
        space.grant("raw", 8 * PAGE, PAGE)
        raw, report = revoke_with([(8 * PAGE, PAGE)])
        (outcome,) = report.clients
        assert outcome.withdrawn == ((8 * PAGE, PAGE),), report
        raw.sock.close()
    # membrokerctl's report shows it too.
    from membroker.ctl import _report

    assert "0x8000+0x1000" in _report(report)


def test_in_flight_ranges_in_an_ack_must_lie_in_what_that_revoke_took(daemon: Daemon) -> None:
    """Buffers a client says were lost in flight go into the owner's report: a raw peer that
    lists too many, unsorted, empty or overlapping ones, or bytes outside the ranges revoked
    from it with that seq (even ones it holds), is refused (protocol error) and its ack
    not counted; byte ranges inside them (not page aligned) are reported as sent."""
    import threading

    with membroker.connect("vmm", str(daemon.runtime_dir)) as owner:
        space = owner.create_space(MiB)
        space.share(0, MiB)
        sid = space.space_id

        def revoke_with(in_flight: list[tuple[int, int]]) -> tuple[Raw, Any]:
            space.grant("raw", 0, 16 * PAGE)
            raw = Raw(daemon.runtime_dir, "raw")
            raw.call(1, "Attach", pb.AttachRequest(space_id=sid, kind=pb.ATTACH_KIND_FD))
            assert raw.result().code == 0
            reports: list[Any] = []
            t = threading.Thread(
                target=lambda: reports.append(
                    space.revoke_many("raw", [(0, 2 * PAGE), (2 * PAGE, PAGE), (8 * PAGE, PAGE)])
                )
            )
            t.start()
            while (frame := raw.next()).WhichOneof("body") != "revoke":
                pass
            ack = spb.RevokeAck(space_id=sid, seq=frame.revoke.seq)
            for offset, length in in_flight:
                ack.in_flight.add(offset=offset, length=length)
            raw.send(spb.Frame(revoke_ack=ack))
            t.join(30)
            return raw, reports[0][0]

        refused = [
            ([(12 * PAGE, 64)], "not in the ranges revoked"),  # held, not revoked
            ([(PAGE, 4 * PAGE)], "not in the ranges revoked"),  # runs past page 3
            ([(7 * PAGE + 2048, PAGE)], "not in the ranges revoked"),  # starts before page 8
            ([(1 << 62, 1 << 62)], "not in the ranges revoked"),  # far outside the space
            ([(PAGE, 0)], "empty, unsorted or overlapping"),
            ([(2 * PAGE, 64), (PAGE, 64)], "empty, unsorted or overlapping"),
            ([(PAGE, 128), (PAGE + 64, 128)], "empty, unsorted or overlapping"),
            ([(i * 64, 32) for i in range(65)], "at most 64"),
        ]
        for in_flight, why in refused:
            raw, report = revoke_with(in_flight)
            error = raw.closed_after_error()
            assert why in error.message, (in_flight, error)
            assert report.clients[0].in_flight == (), report
            assert report.clients[0].outcome != "acked", report
        # Byte ranges inside what was revoked, across two adjacent revoked ranges too.
        good = [(100, 2048), (PAGE + 4000, PAGE + 96), (8 * PAGE + 2048, 2048)]
        raw, report = revoke_with(good)
        (outcome,) = report.clients
        assert outcome.outcome == "acked" and outcome.in_flight == tuple(good), report
        raw.sock.close()
    from membroker.ctl import _report

    assert "0x64+0x800" in _report(report)


def test_an_isolation_note_is_bounded_and_only_for_an_attached_space(daemon: Daemon) -> None:
    """A client's isolation note is shown as it said it; a note of a space it did not
    attach, or one longer than 256 bytes, is refused (protocol error) and changes nothing."""
    with membroker.connect("vmm", str(daemon.runtime_dir)) as owner:
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("raw", 0, MiB)
        sid = space.space_id

        def sessions() -> dict[str, dict[str, str]]:
            return {s.client: dict(s.isolation) for s in owner.list_sessions()}

        for note, why in [("x" * 257, "at most 256"), ("ok", "not attached")]:
            raw = Raw(daemon.runtime_dir, "raw")
            if why != "not attached":
                raw.call(1, "Attach", pb.AttachRequest(space_id=sid, kind=pb.ATTACH_KIND_FD))
                assert raw.result().code == 0
            raw.send(spb.Frame(isolation=spb.Isolation(space_id=sid, logical_only=note)))
            assert why in raw.closed_after_error().message
            assert sessions().get("raw", {}) == {}
        raw = Raw(daemon.runtime_dir, "raw")
        raw.call(1, "Attach", pb.AttachRequest(space_id=sid, kind=pb.ATTACH_KIND_FD))
        assert raw.result().code == 0
        raw.send(spb.Frame(isolation=spb.Isolation(space_id=sid, logical_only="é" * 128)))
        raw.call(2, "GetStats", pb.GetStatsRequest())
        assert raw.result().code == 0  # frames are handled in order: the note is in
        assert sessions()["raw"] == {sid: "é" * 128}
        raw.send(spb.Frame(isolation=spb.Isolation(space_id=sid, logical_only="")))
        raw.call(3, "GetStats", pb.GetStatsRequest())
        assert raw.result().code == 0
        assert sessions()["raw"] == {}
        raw.sock.close()


# A raw peer in its own process: attaches in sealed mode, keeps the read-write description the
# broker hands it, says how it is open, and never reports a sealed mapping.
LAZY_SEALER = """
import fcntl, os, socket, sys, time
from membroker import wire
from membroker._sys import sock as sys_sock
from membroker.v1 import broker_pb2 as pb, session_pb2 as spb
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(wire.encode(spb.Frame(hello=spb.Hello(protocol_version=1, client_name="lazy"))))
request = pb.AttachRequest(
    space_id=sys.argv[2], kind=pb.ATTACH_KIND_VA, va_mode=pb.VA_MODE_SEALED
)
call = spb.Call(id=1, method="Attach", body=request.SerializeToString())
s.sendall(wire.encode(spb.Frame(call=call)))
decoder, kept, answered = wire.FrameDecoder(), [], False
while not answered:
    data, fds, _ = sys_sock.recv_with_fds(s, 1 << 17)
    for frame, frame_fds in decoder.feed(data, fds):
        kept += frame_fds
        answered = answered or frame.WhichOneof("body") == "call_result"
modes = ["rw" if fcntl.fcntl(fd, fcntl.F_GETFL) & 3 == os.O_RDWR else "ro" for fd in kept]
print(modes, flush=True)
time.sleep(60)
"""


def test_a_sealed_attach_that_never_seals_is_fenced(tmp_path: Any) -> None:
    """The read-write description a sealed-mode client holds until it seals is not a way to
    keep one: past seal_timeout_ms the client is fenced, and killed since it still holds it."""
    import subprocess
    import sys

    from tests.conftest import _env

    d = Daemon(tmp_path / "rt", env=dict(_env(), MEMBROKER_SEAL_TIMEOUT_MS="300"))
    try:
        with membroker.connect("vmm", str(d.runtime_dir)) as owner:
            space = owner.create_space(MiB)
            space.share(0, MiB)
            space.grant("lazy", 0, PAGE, "ro")  # read-only, yet the description is O_RDWR
            lazy = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    LAZY_SEALER,
                    str(d.runtime_dir / "session.sock"),
                    space.space_id,
                ],
                stdout=subprocess.PIPE,
                text=True,
                env=_env(),
            )
            try:
                assert lazy.stdout is not None
                assert lazy.stdout.readline().strip() == "['rw']"
                assert lazy.wait(10) == -signal.SIGKILL
            finally:
                if lazy.poll() is None:
                    lazy.kill()
                    lazy.wait(10)
                lazy.stdout.close()  # type: ignore[union-attr]
            assert owner.stats().fenced_total == 1
            assert 'membroker_fenced_total{reason="sealing"} 1.0' in d.scrape()
        assert "did not report its sealed mapping in time (seal_timeout_ms = 300," in d.log()
    finally:
        assert d.stop() == 0


def test_grpc_calls_in_flight_per_session_are_bounded_like_session_calls(tmp_path: Any) -> None:
    """A session's token over gRPC is no way around the 64-calls-in-flight bound."""
    import grpc

    from membroker.v1 import broker_pb2_grpc as pb_grpc

    with daemon_and_clients(tmp_path, 1500, 3600) as (d, start):
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("c", 0, 80 * PAGE)
        c = start("c")
        c.ok("attach_va", space=space.space_id)
        stop_process(c.pid)  # every revoke below now waits for its deadline
        channel = grpc.insecure_channel(f"unix://{d.runtime_dir / 'control.sock'}")
        stub = pb_grpc.MemBrokerStub(channel)  # type: ignore[no-untyped-call]
        metadata = (("membroker-session-token", owner.token),)
        futures = []
        for i in range(64):
            request = pb.RevokeRequest(
                space_id=space.space_id, client="c", range=spb.Range(offset=i * PAGE, length=PAGE)
            )
            futures.append(stub.Revoke.future(request, metadata=metadata, timeout=30))
        time.sleep(0.5)  # the 64 are in flight (queued behind the first)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetStats(pb.GetStatsRequest(), metadata=metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "(limit calls in flight per session = 64)" in (refused.value.details() or "")
        for future in futures:
            future.result()  # the first fenced the frozen client; the rest had nothing to wait for
        assert stub.GetStats(pb.GetStatsRequest(), metadata=metadata, timeout=10).fenced_total == 1
        channel.close()
        owner.close()
        os.kill(c.pid, signal.SIGCONT)
