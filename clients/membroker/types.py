"""Plain data types of the SDK (spaces, ranges, reports) and their protobuf conversions."""

from __future__ import annotations

import dataclasses
import enum

from membroker.v1 import broker_pb2 as pb
from membroker.v1 import session_pb2 as spb


class Access(enum.IntEnum):
    """Effective access to a range: what is granted, intersected with what is shared."""

    NONE = 0
    RO = 1
    RW = 2


@dataclasses.dataclass(frozen=True, slots=True)
class AccessRange:
    """Bytes [offset, offset+length) of the backing, with an access level."""

    offset: int
    length: int
    access: Access

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclasses.dataclass(frozen=True, slots=True)
class Region:
    """Guest-physical [gpa, gpa+size) is backing [offset, offset+size)."""

    gpa: int
    offset: int
    size: int

    def to_pb(self) -> pb.Region:
        return pb.Region(gpa=self.gpa, offset=self.offset, size=self.size)


_BACKINGS: dict[str, pb.Backing] = {
    "memfd": pb.BACKING_MEMFD,
    "guest_memfd": pb.BACKING_GUEST_MEMFD,
    "memfd-hugetlb": pb.BACKING_MEMFD_HUGETLB,
}
_BACKING_NAMES: dict[int, str] = {v: k for k, v in _BACKINGS.items()}
_ACCESS: dict[str, spb.Access] = {"ro": spb.ACCESS_RO, "rw": spb.ACCESS_RW}


def backing_pb(name: str) -> pb.Backing:
    try:
        return _BACKINGS[name]
    except KeyError:
        raise ValueError(f"backing must be one of {', '.join(_BACKINGS)}, not {name!r}") from None


def backing_of(value: int) -> str:
    return _BACKING_NAMES.get(value, "unspecified")


def access_pb(name: str) -> spb.Access:
    try:
        return _ACCESS[name]
    except KeyError:
        raise ValueError(f"access must be 'ro' or 'rw', not {name!r}") from None


_ON_PINNED: dict[str | None, pb.OnPinned] = {
    None: pb.ON_PINNED_DEFAULT,
    "fail": pb.ON_PINNED_FAIL,
    "fence": pb.ON_PINNED_FENCE,
}


def on_pinned_pb(name: str | None) -> pb.OnPinned:
    try:
        return _ON_PINNED[name]
    except KeyError:
        raise ValueError(f"on_pinned must be 'fail', 'fence' or None, not {name!r}") from None


_ACCESS_BY_VALUE: dict[int, Access] = {a.value: a for a in Access}


def access_of(r: spb.AccessRange) -> AccessRange:
    """A wire range as an AccessRange; ValueError for an access level that is not one. (A
    dict lookup, not `Access(value)`: a push of a million ranges calls this a million times.)"""
    try:
        access = _ACCESS_BY_VALUE[r.access]
    except KeyError:
        raise ValueError(f"{r.access} is not a valid Access") from None
    return AccessRange(r.offset, r.length, access)


@dataclasses.dataclass(frozen=True, slots=True)
class SpaceInfo:
    space_id: str
    name: str
    size: int
    backing: str
    owner: str
    ephemeral: bool
    seq: int
    regions: tuple[Region, ...]
    shared_bytes: int
    page_size: int
    imported: bool
    attachments: int
    grant_clients: int

    @classmethod
    def from_pb(cls, s: pb.Space) -> SpaceInfo:
        return cls(
            s.space_id,
            s.name,
            s.size,
            backing_of(s.backing),
            s.owner,
            s.ephemeral,
            s.seq,
            tuple(Region(r.gpa, r.offset, r.size) for r in s.regions),
            s.shared_bytes,
            s.page_size,
            s.imported,
            s.attachments,
            s.grant_clients,
        )

    def gpa_of(self, offset: int) -> int:
        """The guest-physical address of a backing offset (ValueError outside every region)."""
        for r in self.regions:
            if r.offset <= offset < r.offset + r.size:
                return r.gpa + offset - r.offset
        raise ValueError(f"backing offset {offset:#x} is in no region of {self.space_id}")

    def gpa_to_offset(self, gpa: int) -> int:
        """The backing offset of a guest-physical address (ValueError outside every region)."""
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.offset + gpa - r.gpa
        raise ValueError(f"guest-physical address {gpa:#x} is in no region of {self.space_id}")


@dataclasses.dataclass(frozen=True, slots=True)
class ClientOutcome:
    """What one client did in a revocation.

    outcome: "acked", "fenced", "gone" (its session or process ended meanwhile),
    "unverified" (acknowledged, but the kernel's view of it could not be read), or "enforced"
    (a sealed VA client lost write access: the broker write-protected its pages itself and
    checked, without waiting for it). fence: what
    fencing did when outcome is "fenced" -- "disconnected", "killed", "still_mapped" (the
    reason says what it still maps) or "exited" -- and "" otherwise. withdrawn: (offset,
    length) ranges the client still holds but gave up with its acknowledgement (it could not
    keep using them safely, say a vhost-user bridge whose backend maps regions from file
    offset 0); they stay granted. in_flight: (offset, length) byte ranges of buffers its
    device had been offered in the revoked memory and will never touch now. isolation:
    non-empty when the client said its isolation of the space is logical only, and why.
    """

    client: str
    session_id: str
    pid: int
    outcome: str
    latency_us: int
    reason: str
    fence: str = ""
    withdrawn: tuple[tuple[int, int], ...] = ()
    in_flight: tuple[tuple[int, int], ...] = ()
    isolation: str = ""

    @classmethod
    def from_pb(cls, c: pb.ClientOutcome) -> ClientOutcome:
        return cls(
            c.client,
            c.session_id,
            c.pid,
            _OUTCOMES.get(c.outcome, "unknown"),
            c.latency_us,
            c.reason,
            _FENCE_RESULTS.get(c.fence, "unknown"),
            tuple((r.offset, r.length) for r in c.withdrawn),
            tuple((r.offset, r.length) for r in c.in_flight),
            c.isolation,
        )


_OUTCOMES = {
    pb.OUTCOME_ACKED: "acked",
    pb.OUTCOME_FENCED: "fenced",
    pb.OUTCOME_GONE: "gone",
    pb.OUTCOME_UNVERIFIED: "unverified",
    pb.OUTCOME_ENFORCED: "enforced",
}
_FENCE_RESULTS = {
    pb.FENCE_RESULT_UNSPECIFIED: "",
    pb.FENCE_RESULT_DISCONNECTED: "disconnected",
    pb.FENCE_RESULT_KILLED: "killed",
    pb.FENCE_RESULT_STILL_MAPPED: "still_mapped",
    pb.FENCE_RESULT_EXITED: "exited",
}


@dataclasses.dataclass(frozen=True, slots=True)
class RevocationReport:
    """What a revocation did: who acknowledged, how fast, who was fenced and why.

    cause: what started it ("revoke", "private", "downgrade", "delete", "fence"). caller_gone:
    the call that started it was cancelled or timed out, and the revocation ran to its end
    anyway (its report is then found with `Session.list_revocations`).
    """

    space_id: str
    seq: int
    clients: tuple[ClientOutcome, ...]
    duration_us: int
    revoked_bytes: int
    cause: str = ""
    caller_gone: bool = False

    @classmethod
    def from_pb(cls, r: pb.RevocationReport) -> RevocationReport:
        return cls(
            r.space_id,
            r.seq,
            tuple(ClientOutcome.from_pb(c) for c in r.clients),
            r.duration_us,
            r.revoked_bytes,
            r.cause,
            r.caller_gone,
        )

    @property
    def all_acked(self) -> bool:
        """Every client complied: acknowledged and verified, or (a sealed client losing write
        access) enforced by the broker itself and verified."""
        return all(c.outcome in ("acked", "enforced") for c in self.clients)
