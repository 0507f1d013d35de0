"""Every control call with bad arguments gets the right status code and changes nothing."""

from __future__ import annotations

import grpc
import pytest

import membroker
from membroker.v1 import broker_pb2 as pb
from membroker.v1 import broker_pb2_grpc as pb_grpc
from membroker.v1 import session_pb2 as spb

PAGE = 4096
MiB = 1 << 20
C = grpc.StatusCode


def R(offset: int, length: int) -> spb.Range:
    return spb.Range(offset=offset, length=length)


@pytest.fixture(params=["session", "grpc"])
def world(daemon, request):
    """An owner with one space (shared 0..1 MiB, one grant) and a second, foreign session; both
    make their calls on the session socket, or over gRPC (every case is run both ways)."""
    owner = membroker.connect("vmm", daemon.runtime_dir, calls=request.param)
    other = membroker.connect("intruder", daemon.runtime_dir, calls=request.param)
    space = owner.create_space(2 * MiB)
    space.share(0, MiB)
    space.grant("backend", 0, 4 * PAGE)
    yield owner, other, space.space_id
    space.close()
    other.close()
    owner.close()


def _state(session, space_id):
    info = session.get_space(space_id)
    return (
        sorted((s.space_id, s.size, s.shared_bytes) for s in session.list_spaces()),
        info.seq,
        info.shared_bytes,
        session.list_grants(space_id),
        [p.pin_id for p in session.list_pins(space_id)],
    )


def CASES(sid):
    return [
        # (who, method, request, expected code, text in details)
        (
            "owner",
            "CreateSpace",
            pb.CreateSpaceRequest(size=0, backing=pb.BACKING_MEMFD),
            C.INVALID_ARGUMENT,
            "positive multiple",
        ),
        (
            "owner",
            "CreateSpace",
            pb.CreateSpaceRequest(size=PAGE + 1, backing=pb.BACKING_MEMFD),
            C.INVALID_ARGUMENT,
            "page size",
        ),
        (
            "owner",
            "CreateSpace",
            pb.CreateSpaceRequest(size=PAGE),
            C.INVALID_ARGUMENT,
            "backing must be",
        ),
        (
            "owner",
            "CreateSpace",
            pb.CreateSpaceRequest(size=1 << 50, backing=pb.BACKING_MEMFD),
            C.INVALID_ARGUMENT,
            "max_space_bytes",
        ),
        (
            "owner",
            "CreateSpace",
            pb.CreateSpaceRequest(
                size=MiB, backing=pb.BACKING_MEMFD, regions=[pb.Region(gpa=0, offset=MiB, size=MiB)]
            ),
            C.INVALID_ARGUMENT,
            "beyond the space size",
        ),
        (
            "owner",
            "CreateSpace",
            pb.CreateSpaceRequest(
                size=MiB,
                backing=pb.BACKING_MEMFD,
                regions=[
                    pb.Region(gpa=0, offset=0, size=2 * PAGE),
                    pb.Region(gpa=PAGE, offset=4 * PAGE, size=PAGE),
                ],
            ),
            C.INVALID_ARGUMENT,
            "overlap",
        ),
        (
            "owner",
            "CreateSpace",
            pb.CreateSpaceRequest(size=MiB, backing=pb.BACKING_MEMFD_HUGETLB, huge_page_size=12345),
            C.INVALID_ARGUMENT,
            "",
        ),
        (
            "owner",
            "ImportSpace",
            pb.ImportSpaceRequest(fd_tag=77),
            C.INVALID_ARGUMENT,
            "no fd offered",
        ),
        ("owner", "GetSpace", pb.GetSpaceRequest(space_id="sp-nope"), C.NOT_FOUND, "sp-nope"),
        ("owner", "DeleteSpace", pb.DeleteSpaceRequest(space_id="sp-nope"), C.NOT_FOUND, ""),
        (
            "other",
            "DeleteSpace",
            pb.DeleteSpaceRequest(space_id=sid),
            C.PERMISSION_DENIED,
            "not the owner",
        ),
        (
            "owner",
            "SetAttributes",
            pb.SetAttributesRequest(space_id=sid, range=R(0, PAGE)),
            C.INVALID_ARGUMENT,
            "attribute must be",
        ),
        (
            "owner",
            "SetAttributes",
            pb.SetAttributesRequest(space_id=sid, range=R(1, PAGE), attribute=pb.ATTRIBUTE_PRIVATE),
            C.INVALID_ARGUMENT,
            "",
        ),
        (
            "owner",
            "SetAttributes",
            pb.SetAttributesRequest(
                space_id=sid, range=R(MiB, 2 * MiB), attribute=pb.ATTRIBUTE_SHARED
            ),
            C.INVALID_ARGUMENT,
            "",
        ),
        (
            "owner",
            "SetAttributes",
            pb.SetAttributesRequest(space_id=sid, attribute=pb.ATTRIBUTE_SHARED),
            C.INVALID_ARGUMENT,
            "range (or ranges) is required",
        ),
        (
            "other",
            "SetAttributes",
            pb.SetAttributesRequest(space_id=sid, range=R(0, PAGE), attribute=pb.ATTRIBUTE_PRIVATE),
            C.PERMISSION_DENIED,
            "",
        ),
        (
            "owner",
            "Grant",
            pb.GrantRequest(space_id=sid, client="b", range=R(0, PAGE)),
            C.INVALID_ARGUMENT,
            "access must be",
        ),
        (
            "owner",
            "Grant",
            pb.GrantRequest(space_id=sid, client="b", range=R(0, PAGE - 1), access=spb.ACCESS_RW),
            C.INVALID_ARGUMENT,
            "",
        ),
        (
            "owner",
            "Grant",
            pb.GrantRequest(space_id=sid, client="b", range=R(0, 0), access=spb.ACCESS_RW),
            C.INVALID_ARGUMENT,
            "",
        ),
        (
            "owner",
            "Grant",
            pb.GrantRequest(
                space_id=sid, client="b", range=R(2**64 - PAGE, PAGE), access=spb.ACCESS_RW
            ),
            C.INVALID_ARGUMENT,
            "",
        ),
        (
            "owner",
            "Grant",
            pb.GrantRequest(
                space_id=sid, client="bad name", range=R(0, PAGE), access=spb.ACCESS_RW
            ),
            C.INVALID_ARGUMENT,
            "client name",
        ),
        (
            "owner",
            "Grant",
            pb.GrantRequest(space_id=sid, client="b", range=R(MiB, PAGE), access=spb.ACCESS_RW),
            C.FAILED_PRECONDITION,
            "private",
        ),
        (
            "other",
            "Grant",
            pb.GrantRequest(
                space_id=sid, client="intruder", range=R(0, PAGE), access=spb.ACCESS_RW
            ),
            C.PERMISSION_DENIED,
            "",
        ),
        (
            "owner",
            "Grant",
            pb.GrantRequest(space_id="sp-nope", client="b", range=R(0, PAGE), access=spb.ACCESS_RW),
            C.NOT_FOUND,
            "",
        ),
        (
            "owner",
            "Revoke",
            pb.RevokeRequest(space_id=sid, range=R(0, PAGE)),
            C.INVALID_ARGUMENT,
            "client is required",
        ),
        (
            "other",
            "Revoke",
            pb.RevokeRequest(space_id=sid, client="backend", range=R(0, PAGE)),
            C.PERMISSION_DENIED,
            "",
        ),
        (
            "owner",
            "Revoke",
            pb.RevokeRequest(space_id=sid, client="backend", range=R(3 * MiB, PAGE)),
            C.INVALID_ARGUMENT,
            "",
        ),
        ("owner", "ListGrants", pb.ListGrantsRequest(space_id="sp-nope"), C.NOT_FOUND, ""),
        ("owner", "Attach", pb.AttachRequest(space_id=sid), C.INVALID_ARGUMENT, "kind must be"),
        (
            "owner",
            "Attach",
            pb.AttachRequest(space_id="sp-nope", kind=pb.ATTACH_KIND_VA),
            C.NOT_FOUND,
            "",
        ),
        ("owner", "Detach", pb.DetachRequest(space_id=sid), C.FAILED_PRECONDITION, "not attached"),
        (
            "owner",
            "Pin",
            pb.PinRequest(space_id=sid, range=R(0, PAGE)),
            C.FAILED_PRECONDITION,
            "attach",
        ),
        ("owner", "Unpin", pb.UnpinRequest(space_id=sid, pin_id=5), C.NOT_FOUND, "no pin 5"),
        ("owner", "ListPins", pb.ListPinsRequest(space_id="sp-nope"), C.NOT_FOUND, ""),
        # Batches: sorted, disjoint, positive, bounded, and never both forms.
        (
            "owner",
            "Grant",
            pb.GrantRequest(
                space_id=sid,
                client="x",
                range=R(0, PAGE),
                ranges=[R(0, PAGE)],
                access=spb.ACCESS_RW,
            ),
            C.INVALID_ARGUMENT,
            "give range or ranges, not both",
        ),
        (
            "owner",
            "Grant",
            pb.GrantRequest(
                space_id=sid,
                client="x",
                ranges=[R(2 * PAGE, PAGE), R(0, PAGE)],
                access=spb.ACCESS_RW,
            ),
            C.INVALID_ARGUMENT,
            "sorted and disjoint",
        ),
        (
            "owner",
            "Revoke",
            pb.RevokeRequest(space_id=sid, client="x", ranges=[R(0, 2 * PAGE), R(PAGE, PAGE)]),
            C.INVALID_ARGUMENT,
            "sorted and disjoint",
        ),
        (
            "owner",
            "SetAttributes",
            pb.SetAttributesRequest(
                space_id=sid, ranges=[R(0, PAGE), R(PAGE, 0)], attribute=pb.ATTRIBUTE_PRIVATE
            ),
            C.INVALID_ARGUMENT,
            "range length must be positive",
        ),
        (
            "owner",
            "SetAttributes",
            pb.SetAttributesRequest(
                space_id=sid,
                ranges=[R(2 * i * PAGE, PAGE) for i in range(16_385)],
                attribute=pb.ATTRIBUTE_PRIVATE,
            ),
            C.INVALID_ARGUMENT,
            "16385 ranges in one call; at most 16384",
        ),
        (
            "owner",
            "Grant",
            pb.GrantRequest(
                space_id=sid,
                client="x",
                ranges=[R(0, PAGE), R(60 * MiB, PAGE)],
                access=spb.ACCESS_RW,
            ),
            C.INVALID_ARGUMENT,
            "past the end of the space",
        ),
    ]


def test_bad_requests_get_the_right_code_and_change_nothing(world):
    owner, other, sid = world
    before = _state(owner, sid)
    for who, method, request, code, text in CASES(sid):
        session = owner if who == "owner" else other
        with pytest.raises(membroker.BrokerError) as info:
            session.call(method, request)
        err = info.value
        assert (err.code, method) == (code, method), f"{method} {request}: {err}"
        assert text in err.details, (method, err.details)
        assert err.request is request and err.method == method
        if session.calls == "grpc":
            assert isinstance(err.__cause__, grpc.RpcError)
        assert _state(owner, sid) == before, f"{method} changed state"


@pytest.mark.parametrize("metadata", [(), (("membroker-session-token", "forged"),)])
def test_calls_without_a_live_token_are_unauthenticated(daemon, world, metadata):
    owner, _, sid = world
    before = _state(owner, sid)
    with grpc.insecure_channel(f"unix:{daemon.runtime_dir / 'control.sock'}") as channel:
        stub = pb_grpc.MemBrokerStub(channel)
        for call, request in (
            (stub.ListSpaces, pb.ListSpacesRequest()),
            (stub.DeleteSpace, pb.DeleteSpaceRequest(space_id=sid)),
            (
                stub.Grant,
                pb.GrantRequest(space_id=sid, client="x", range=R(0, PAGE), access=spb.ACCESS_RW),
            ),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call(request, metadata=metadata, timeout=10)
            assert info.value.code() == C.UNAUTHENTICATED
            assert "session token" in info.value.details()
    assert _state(owner, sid) == before


def test_token_of_a_closed_session_stops_working(daemon):
    session = membroker.connect("short", daemon.runtime_dir)
    token = session.token
    session.close()
    with grpc.insecure_channel(f"unix:{daemon.runtime_dir / 'control.sock'}") as channel:
        stub = pb_grpc.MemBrokerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListSpaces(
                pb.ListSpacesRequest(), metadata=(("membroker-session-token", token),), timeout=10
            )
        assert info.value.code() == C.UNAUTHENTICATED


def test_sdk_maps_codes_to_typed_exceptions(world):
    owner, other, sid = world
    with pytest.raises(membroker.NotFound):
        owner.get_space("sp-missing")
    with pytest.raises(membroker.PermissionDenied):
        other.space(sid).revoke("backend", 0, PAGE)
    with pytest.raises(membroker.InvalidArgument):
        owner.space(sid).share(1, PAGE)


def test_health_and_reflection_are_served(daemon):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"unix:{daemon.runtime_dir / 'control.sock'}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = health.Check(
            health_pb2.HealthCheckRequest(service="membroker.v1.MemBroker"), timeout=10
        )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            refl.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        names = {s.name for s in answers[0].list_services_response.service}
        assert "membroker.v1.MemBroker" in names and "grpc.health.v1.Health" in names
