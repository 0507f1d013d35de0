"""A stateful property test of the revocation engine against a real daemon (issue 7).

The world: one membrokerd (revoke deadline 600 ms, an audit every 0.25 s); two owners with
sessions of their own -- "vmm-a" in this process, "vmm-b" in a client process -- each owning
one 64-page memfd space at a time; 3-4 clients, VaClient and FdClient kinds, each in a process
of its own (tests/integration/client_proc.py). Hypothesis interleaves share / private / grant /
revoke / delete (then a new space) / attach / detach / pin / unpin / kill / SIGSTOP / SIGCONT /
lie / touch / restart, owner calls cancelled by a 50 ms deadline, two owner calls at once (one
space: ordered by the space's queue; two spaces: truly in parallel), and revocations raced by
an unpin or a SIGCONT. A pure model (`World`) predicts every step; after every step:

1. Fencing: exactly the misbehaving clients are fenced, never a compliant one. A client
   misbehaves only when the test makes it: SIGSTOPped across a revocation's deadline, or a VA
   client told to lie (op "lie": acks without tearing down) meeting a revocation (a delete
   unmaps it anyway: acked). Every report lists exactly the attached clients that lost access
   (all attached clients for a delete) with the predicted outcome and pid, the revoked bytes
   and the cause; nothing is "gone" or "unverified". stats().fenced_total == fences predicted.
2. The kernel's view (/proc/PID/maps, /proc/PID/pagemap bit 63 present / 62 swapped / 58 guard
   marker, /proc/PID/fd): every live client process reaches, of every space ever created,
   nothing beyond the model's effective access (grants ∩ shared): no unguarded page of a
   readable (writable) mapping outside what it may read (write), no present page in a PROT_NONE
   mapping outside it, no fd of the space unless it is an attached fd client; of a space it is
   not attached to (detached, deleted, fenced) it maps and holds nothing at all. So every client
   reported "acked" provably cannot reach what it lost. "touch" makes it concrete: a page not
   held kills the client with SIGSEGV, a page held reads.
3. Every client reported "fenced" is dead or disconnected as the report's `fence` says: "killed"
   => the process died of SIGKILL; "disconnected" => alive and reaching nothing at that moment,
   and, once running, mapping and holding nothing of any space; no other result.
4. The client's own view (op "ranges") equals the model's effective access for every live,
   running, attached client once pushes settle; an attach reply equals it at once.
5. The broker's state equals the model's: grants (ListGrants), shared bytes, pins, sessions and
   what each is attached to. A pinned range makes a revocation wait (fail after the deadline);
   a revocation raced by an unpin or a SIGCONT waits for it and is acknowledged.
6. A cancelled call still completes: its report is found by revocations(), marked caller_gone
   when it outlived the call, behind a later call that waits for it.
7. At the end, with every client closed: the daemon is alive, its session list is the owners',
   its fd count is back to the baseline once the spaces are deleted, its log has no traceback,
   and it exits 0.

Reproducible: the examples are derandomized unless MEMBROKER_MODEL_SEED is set (then that
seed); a failure prints its steps and a @reproduce_failure blob. MEMBROKER_MODEL_EXAMPLES /
MEMBROKER_MODEL_STEPS resize it (12 examples of up to 40 steps: ~30 s on 2 cores);
MEMBROKER_MODEL_SHRINK=1 also shrinks a failure (slow: every attempt starts real processes;
use --timeout 0); MEMBROKER_MODEL_JOURNAL=path appends every example's steps and outcomes.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

import membroker
from membroker.errors import BrokerError
from membroker.types import RevocationReport
from membroker.v1 import broker_pb2 as pb
from membroker.v1 import session_pb2 as spb
from tests.conftest import ClientProc, Daemon, _env, stop_process

PAGE = 4096
PAGES = 64
SIZE = PAGES * PAGE
DEADLINE_MS = 600
AUDIT_INTERVAL_S = "0.25"
CANCEL_AFTER_S = 0.05
# When a racing unpin or SIGCONT comes, well inside the deadline.
RACE_AFTER_S = 0.15
WAIT_S = 5.0
OWNERS = ("A", "B")
OWNER_NAMES = {"A": "vmm-a", "B": "vmm-b"}
BARRIER_CLIENT = "zz-barrier"
# Steps a space lives before the delete rule may take it.
SPACE_MIN_STEPS = 5

LIVE, FENCED, DEAD = "live", "fenced", "dead"
ACKED = "acked"

PM_PRESENT, PM_SWAPPED, PM_GUARD = 1 << 63, 1 << 62, 1 << 58
PM_UFFD_WP = 1 << 57  # the page is write-protected through userfaultfd


# -- the kernel's view ---------------------------------------------------------------------------


@dataclasses.dataclass
class Reach:
    """What a process reaches of one file: pages by file page number, mappings, fds."""

    readable: set[int] = dataclasses.field(default_factory=set)
    writable: set[int] = dataclasses.field(default_factory=set)
    vmas: int = 0
    fds: int = 0
    # Of `vmas`, the sealed ones served by a userfaultfd: a client cannot unmap them, so after
    # detach they stay, inert (nothing present, every touch refused by the broker).
    sealed_vmas: int = 0

    @property
    def nothing(self) -> bool:
        return not self.readable and not self.writable and not self.fds

    @property
    def absent(self) -> bool:
        """Maps and holds nothing of the file (an inert sealed mapping with nothing present
        counts as nothing)."""
        return self.vmas == self.sealed_vmas and self.fds == 0 and not self.readable


def kernel_reach(pid: int, files: Iterable[tuple[int, int]]) -> dict[tuple[int, int], Reach] | None:
    """What process `pid` reaches of each file (dev, ino), from /proc alone; None if it is gone.

    A page of a readable or writable mapping is reachable unless it carries a guard marker; a
    page of a PROT_NONE mapping is reachable (through /proc/PID/mem) while it is present or
    swapped and not guarded. A sealed mapping whose faults a userfaultfd serves (smaps VmFlags
    `sl` and `ui`: sealed VA mode) reaches its present pages, and writes those present without
    the uffd-wp bit where it is writable: any other touch is decided by the broker.
    """
    out = {f: Reach() for f in files}
    try:
        with open(f"/proc/{pid}/smaps") as smaps:
            lines = smaps.read().splitlines()
        vmas: list[tuple[list[str], set[str]]] = []
        for line in lines:
            if line.startswith("VmFlags:"):
                if vmas:
                    vmas[-1][1].update(line.split()[1:])
            elif not line.split(None, 1)[0].endswith(":"):
                vmas.append((line.split(None, 5), set()))
        pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for fields, flags in vmas:
                if len(fields) < 5 or fields[4] == "0":
                    continue
                major, minor = fields[3].split(":")
                found = out.get((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
                if found is None:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                perms, first = fields[1], int(fields[2], 16) // PAGE
                sealed = {"sl", "ui"} <= flags
                found.vmas += 1
                found.sealed_vmas += sealed
                data = os.pread(pagemap, (end - start) // PAGE * 8, start // PAGE * 8)
                for index, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
                    page = first + index
                    if sealed:
                        if entry & PM_PRESENT:
                            found.readable.add(page)
                            if perms[1] == "w" and not entry & PM_UFFD_WP:
                                found.writable.add(page)
                        continue
                    if entry & PM_GUARD:
                        continue
                    if perms[0] == "r" or perms[1] == "w":
                        if perms[0] == "r":
                            found.readable.add(page)
                        if perms[1] == "w":
                            found.writable.add(page)
                    elif entry & (PM_PRESENT | PM_SWAPPED):
                        found.readable.add(page)
        finally:
            os.close(pagemap)
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                st_ = os.stat(f"/proc/{pid}/fd/{name}")
            except FileNotFoundError:
                continue
            held = out.get((st_.st_dev, st_.st_ino))
            if held is not None:
                held.fds += 1
    except (FileNotFoundError, ProcessLookupError):
        return None
    return out


def pages_str(pages: Iterable[int]) -> str:
    return ",".join(str(p) for p in sorted(pages)) or "-"


def ranges_of(readable: set[int], writable: set[int]) -> list[list[Any]]:
    """Pages as the SDK reports ranges: [offset, length, "RO"|"RW"], maximal runs per level."""
    out: list[list[Any]] = []
    for p in sorted(readable):
        level = "RW" if p in writable else "RO"
        if out and out[-1][0] + out[-1][1] == p * PAGE and out[-1][2] == level:
            out[-1][1] += PAGE
        else:
            out.append([p * PAGE, PAGE, level])
    return out


# -- the model -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    """One owner call: share, unshare, grant, revoke or delete of owner's current space."""

    kind: str
    owner: str
    client: str = ""
    lo: int = 0
    n: int = PAGES
    access: str = "rw"

    def __str__(self) -> str:
        who = f" {self.client}" if self.kind in ("grant", "revoke") else ""
        what = f" {self.access}" if self.kind == "grant" else ""
        where = "" if self.kind == "delete" else f" pages [{self.lo},{self.lo + self.n})"
        return f"{self.owner}.{self.kind}{who}{where}{what}"


@dataclasses.dataclass
class MSpace:
    space_id: str
    shared: set[int] = dataclasses.field(default_factory=set)
    # Grant records (not intersected with shared), by client name; a record exists while its
    # readable set is not empty, as in the broker's table.
    readable: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    writable: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    # pin id -> (client, first page, end page)
    pins: dict[int, tuple[str, int, int]] = dataclasses.field(default_factory=dict)

    def effective(self, name: str) -> tuple[set[int], set[int]]:
        return (
            self.readable.get(name, set()) & self.shared,
            self.writable.get(name, set()) & self.shared,
        )


@dataclasses.dataclass
class MClient:
    name: str
    kind: str  # "va" | "fd"
    pid: int = 0
    state: str = LIVE  # live: its session is open; fenced; dead (killed, crashed)
    stopped: bool = False
    # space id -> whether it lies (acks revocations of that space without tearing down)
    attached: dict[str, bool] = dataclasses.field(default_factory=dict)
    # space id -> its VA attachment is sealed (the broker faults pages in, write-protects)
    sealed: dict[str, bool] = dataclasses.field(default_factory=dict)
    # space ids whose sealed mapping is read-only for good (attached without a rw grant)
    read_only: set[str] = dataclasses.field(default_factory=set)
    # space id -> pages present in its sealed mapping, read from the kernel before a call
    present: dict[str, set[int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Expect:
    """What the model predicts of one owner call."""

    error: str | None = None  # not_shared | pinned | not_found
    cause: str = ""
    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)
    revoked: int = 0
    slow: bool = False  # waits for a deadline (a pin, a stopped client)
    in_history: bool = False  # leaves a report for ListRevocations


class World:
    """The model: spaces, grants, pins, clients; `run` predicts an owner call and applies it."""

    def __init__(self) -> None:
        self.spaces: dict[str, MSpace | None] = dict.fromkeys(OWNERS)
        self.clients: dict[str, MClient] = {}
        self.fences = 0

    def live(self) -> list[MClient]:
        return [c for c in self.clients.values() if c.state == LIVE]

    def space_of(self, space_id: str) -> MSpace | None:
        return next((s for s in self.spaces.values() if s and s.space_id == space_id), None)

    def key(self) -> Any:
        """A canonical form, to tell whether two histories end in the same state."""
        spaces = {
            o: None
            if s is None
            else (
                sorted(s.shared),
                sorted((n, sorted(r)) for n, r in s.readable.items()),
                sorted((n, sorted(w)) for n, w in s.writable.items()),
                sorted(s.pins.items()),
            )
            for o, s in self.spaces.items()
        }
        clients = sorted(
            (c.name, c.state, c.stopped, sorted(c.attached.items())) for c in self.clients.values()
        )
        return spaces, clients, self.fences

    @staticmethod
    def _pinned(sp: MSpace, pages: set[int], client: str | None) -> bool:
        return any(
            (client is None or holder == client) and pages & set(range(a, b))
            for holder, a, b in sp.pins.values()
        )

    def run(self, op: Op) -> Expect:
        sp = self.spaces[op.owner]
        if sp is None:
            return Expect(error="not_found")
        pages = set(range(op.lo, op.lo + op.n))
        if op.kind == "share":
            sp.shared |= pages
            return Expect(cause="shared")
        if op.kind == "grant":
            if not pages <= sp.shared:
                return Expect(error="not_shared")
            readable = sp.readable.setdefault(op.client, set())
            writable = sp.writable.setdefault(op.client, set())
            lowered = {}
            if op.access == "ro" and writable & pages:
                lowered[op.client] = writable & pages
            readable |= pages
            if op.access == "rw":
                writable |= pages
            else:
                writable -= pages
            return self._lower(sp, lowered, "downgrade")
        if op.kind == "revoke":
            if self._pinned(sp, pages, op.client):
                return Expect(error="pinned", slow=True)
            lowered = {}
            readable = sp.readable.get(op.client)
            if readable is not None:
                if readable & pages & sp.shared:
                    lowered[op.client] = readable & pages & sp.shared
                readable -= pages
                sp.writable[op.client] -= pages
                if not readable:
                    del sp.readable[op.client], sp.writable[op.client]
            return self._lower(sp, lowered, "revoke")
        if op.kind == "unshare":
            if self._pinned(sp, pages, None):
                return Expect(error="pinned", slow=True)
            lowered = {
                n: r & sp.shared & pages for n, r in sp.readable.items() if r & sp.shared & pages
            }
            sp.shared -= pages
            return self._lower(sp, lowered, "private")
        assert op.kind == "delete", op
        if sp.pins:
            return Expect(error="pinned", slow=True)
        attached = [c for c in self.live() if sp.space_id in c.attached]
        # A liar is acked here: the SDK releases a deleted space's mapping whatever it does.
        outcomes = {c.name: "fenced" if c.stopped else ACKED for c in attached}
        self.spaces[op.owner] = None
        for c in attached:
            del c.attached[sp.space_id]
        slow = False
        for name, outcome in outcomes.items():
            if outcome == "fenced":
                slow = True
                self.fence(name)
        return Expect(cause="delete", outcomes=outcomes, revoked=SIZE, slow=slow, in_history=True)

    def _lower(self, sp: MSpace, lowered: dict[str, set[int]], cause: str) -> Expect:
        """Access went down for `lowered`: attached sessions are asked and judged."""
        outcomes = {}
        slow = False
        for name, pages in sorted(lowered.items()):
            c = self.clients.get(name)
            if c is None or c.state != LIVE or sp.space_id not in c.attached:
                continue
            if c.sealed.get(sp.space_id) and cause == "downgrade":
                # Write access only: the broker write-protects it itself, stopped or lying.
                outcomes[name] = "enforced"
                continue
            lies = c.attached[sp.space_id]
            if c.sealed.get(sp.space_id):
                # A lie is caught only where it kept pages present: anything else it would
                # have to fault in, and the broker refuses once it has acknowledged.
                lies = lies and bool(c.present.get(sp.space_id, set()) & pages)
            bad = c.stopped or lies
            outcomes[name] = "fenced" if bad else ACKED
            slow = slow or c.stopped
            if not bad:
                # An acknowledged revocation releases the client's pins in what it lost.
                for pin_id, (holder, a, b) in list(sp.pins.items()):
                    if holder == name and pages & set(range(a, b)):
                        del sp.pins[pin_id]
        for name, outcome in outcomes.items():
            if outcome == "fenced":
                self.fence(name)
        revoked = PAGE * sum(len(p) for p in lowered.values())
        return Expect(
            cause=cause, outcomes=outcomes, revoked=revoked, slow=slow, in_history=bool(revoked)
        )

    def fence(self, name: str) -> None:
        """Its session is closed and its grants are dropped everywhere."""
        self.fences += 1
        self.end_session(name, FENCED)
        for sp in self.spaces.values():
            if sp is not None:
                sp.readable.pop(name, None)
                sp.writable.pop(name, None)

    def end_session(self, name: str, state: str) -> None:
        """The session is gone (fenced, killed): attachments and pins go; grants stay."""
        c = self.clients[name]
        c.state = state
        c.attached.clear()
        for sp in self.spaces.values():
            if sp is not None:
                for pin_id in [i for i, (holder, _, _) in sp.pins.items() if holder == name]:
                    del sp.pins[pin_id]

    def detach(self, name: str, space_id: str) -> None:
        del self.clients[name].attached[space_id]
        sp = self.space_of(space_id)
        assert sp is not None
        for pin_id in [i for i, (holder, _, _) in sp.pins.items() if holder == name]:
            del sp.pins[pin_id]


# -- owners --------------------------------------------------------------------------------------


class OwnerError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def kind(self) -> str:
        if self.code == "DEADLINE_EXCEEDED":
            return "deadline"
        if self.code == "NOT_FOUND":
            return "not_found"
        if self.code == "FAILED_PRECONDITION" and "pinned" in self.message:
            return "pinned"
        if self.code == "FAILED_PRECONDITION" and "not shared" in self.message:
            return "not_shared"
        return str(self)


def report_dict(r: RevocationReport) -> dict[str, Any]:
    """A report as client_proc's "own" op sends it."""
    return {
        "seq": r.seq,
        "cause": r.cause,
        "revoked_bytes": r.revoked_bytes,
        "caller_gone": r.caller_gone,
        "clients": [[c.client, c.outcome, c.fence, c.pid, c.reason] for c in r.clients],
    }


class LocalOwner:
    """Owner "vmm-a": a session of this process."""

    def __init__(self, runtime_dir: Path) -> None:
        self.session = membroker.connect(OWNER_NAMES["A"], runtime_dir)
        self.pid = os.getpid()
        self.spaces: dict[str, membroker.OwnedSpace] = {}

    def create(self) -> tuple[str, int, int]:
        space = self.session.create_space(SIZE)
        self.spaces[space.space_id] = space
        assert space.fd is not None
        st_ = os.fstat(space.fd)
        return space.space_id, st_.st_dev, st_.st_ino

    def call(self, space_id: str, call: str, **kw: Any) -> dict[str, Any]:
        space = self.spaces[space_id]
        try:
            if call == "share":
                return report_dict(space.share(kw["offset"], kw["length"]))
            if call == "unshare":
                return report_dict(space.unshare(kw["offset"], kw["length"]))
            if call == "grant":
                return {"seq": space.grant(kw["client"], kw["offset"], kw["length"], kw["access"])}
            if call == "revoke" and kw.get("deadline_s"):
                request = pb.RevokeRequest(
                    space_id=space_id,
                    client=kw["client"],
                    range=spb.Range(offset=kw["offset"], length=kw["length"]),
                )
                resp = self.session.call("Revoke", request, timeout=kw["deadline_s"])
                return report_dict(RevocationReport.from_pb(resp))
            if call == "revoke":
                return report_dict(space.revoke(kw["client"], kw["offset"], kw["length"]))
            if call == "delete":
                # The handle stays: a call racing the delete must meet the broker's NOT_FOUND.
                return report_dict(space.delete())
            if call == "revocations":
                return {"reports": [report_dict(r) for r in space.revocations(kw["after_seq"])]}
            if call == "seq":
                return {"seq": space.refresh().seq}
        except BrokerError as exc:
            raise OwnerError(exc.code.name, str(exc)) from exc
        raise ValueError(call)

    def close(self) -> None:
        for space in self.spaces.values():
            space.close()
        self.session.close()


class ProcOwner:
    """Owner "vmm-b": client_proc.py in a process of its own (ops own_create, own)."""

    def __init__(self, runtime_dir: Path) -> None:
        self.proc = ClientProc(runtime_dir, OWNER_NAMES["B"])
        self.pid = self.proc.pid
        self.proc.ok("ranges_of_nothing")  # opens its gRPC channel before the fd baseline

    def create(self) -> tuple[str, int, int]:
        out = self.proc.ok("own_create", size=SIZE)
        return out["space"], out["dev"], out["ino"]

    def call(self, space_id: str, call: str, **kw: Any) -> dict[str, Any]:
        out = self.proc.cmd("own", timeout=20, space=space_id, call=call, **kw)
        if not out.get("ok"):
            if "code" not in out:
                raise AssertionError(f"owner process failed: {out}")
            raise OwnerError(out["code"], out["error"])
        return out

    def close(self) -> None:
        self.proc.close()


# -- the state machine ---------------------------------------------------------------------------


@dataclasses.dataclass
class Observed:
    error: str | None = None
    message: str = ""
    seq: int | None = None
    report: dict[str, Any] | None = None
    elapsed: float = 0.0
    done_at: float = 0.0  # time.monotonic() when it returned


def _clip(rng: tuple[int, int]) -> tuple[int, int]:
    lo, n = rng
    return lo, max(1, min(n, PAGES - lo))


def _within(pages: set[int], rng: tuple[int, int]) -> tuple[int, int]:
    """A range inside `pages` drawn from `rng`: from one of them (by index), at most n long,
    along a run of consecutive pages; `rng` itself when `pages` is empty."""
    lo, n = _clip(rng)
    if not pages:
        return lo, n
    first = sorted(pages)[lo % len(pages)]
    end = first
    while end < first + n and end in pages:
        end += 1
    return first, end - first


def _thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _join(t: threading.Thread, box: dict[str, Any], timeout: float = 20.0) -> Any:
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"an owner call did not return within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


range_st = st.one_of(st.tuples(st.integers(0, PAGES - 1), st.integers(1, 16)), st.just((0, PAGES)))
pick_st = st.integers(0, 7)
owner_st = st.sampled_from(OWNERS)
access_st = st.sampled_from(["rw", "ro"])
kinds_st = st.lists(st.sampled_from(["va", "fd"]), min_size=3, max_size=4).filter(
    lambda kinds: len(set(kinds)) == 2
)
pair_op_st = st.tuples(
    st.sampled_from(["share", "unshare", "grant", "grant", "revoke", "revoke", "delete"]),
    pick_st,
    range_st,
    access_st,
)


class RevocationModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="membroker-model-"))
        self.world = World()
        self.procs: dict[str, ClientProc] = {}
        self.files: dict[str, tuple[int, int]] = {}  # every space ever: id -> (dev, ino)
        self.owners: dict[str, Any] = {}
        self.in_step = False
        self.journal: list[str] = []
        self.steps = 0
        self.born: dict[str, int] = {}  # owner -> the step its space was created in
        env = dict(_env(), MEMBROKER_AUDIT_INTERVAL_S=AUDIT_INTERVAL_S)
        try:
            self.daemon = Daemon(self.tmp / "rt", "--revoke-deadline-ms", str(DEADLINE_MS), env=env)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)  # its error carries the daemon's log
            raise
        try:
            self.owners["A"] = LocalOwner(self.daemon.runtime_dir)
            self.owners["B"] = ProcOwner(self.daemon.runtime_dir)
            self.owners["A"].session.list_spaces()  # opens its gRPC channel
            self.baseline_fds = self._settled_fds()
        except BaseException:
            self._cleanup()
            raise

    # -- helpers ---------------------------------------------------------------------------------

    def fail(self, message: str) -> None:
        log = self.daemon.log().splitlines()[-40:]
        raise AssertionError(
            f"{message}\n(daemon log: {self.daemon.log_path})\n--- last steps ---\n"
            + "\n".join(self.journal[-12:])
            + "\n--- daemon log (tail) ---\n"
            + "\n".join(log)
        )

    def check(self, ok: object, message: str | Callable[[], str]) -> None:
        if not ok:
            self.fail(message() if callable(message) else message)

    def note(self, text: str) -> None:
        self.journal.append(text)

    def _settled_fds(self) -> int:
        """The daemon's fd count once it stops changing for 0.2 s (bounded)."""
        deadline = time.monotonic() + WAIT_S
        last, since = self.daemon.open_fds(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.daemon.open_fds()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= 0.2:
                break
        return last

    def client(self, name: str) -> MClient:
        return self.world.clients[name]

    def pick(self, index: int, ok: Callable[[MClient], bool]) -> MClient | None:
        eligible = [c for c in self.world.clients.values() if ok(c)]
        return eligible[index % len(eligible)] if eligible else None

    def running(self, c: MClient) -> bool:
        return c.state == LIVE and not c.stopped

    def space_id(self, owner: str) -> str | None:
        sp = self.world.spaces[owner]
        return sp.space_id if sp else None

    def create_space(self, owner: str) -> None:
        space_id, dev, ino = self.owners[owner].create()
        for old, f in list(self.files.items()):
            if f == (dev, ino):  # an inode number reused: the old file is gone
                del self.files[old]
        self.files[space_id] = (dev, ino)
        self.world.spaces[owner] = MSpace(space_id)
        self.born[owner] = self.steps
        self.note(f"  {owner} created {space_id} (inode {ino})")

    def sessions(self) -> dict[int, Any]:
        return {s.pid: s for s in self.owners["A"].session.list_sessions()}

    def wait_session_gone(self, pid: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while pid in self.sessions():
            if time.monotonic() > deadline:
                self.fail(f"the session of dead pid {pid} is still listed after {WAIT_S} s")
            time.sleep(0.02)

    def wait_rc(self, proc: ClientProc, timeout: float = WAIT_S) -> int:
        try:
            return proc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"client {proc.name} (pid {proc.pid}) did not exit within {timeout} s")
            raise

    # -- executing owner calls ---------------------------------------------------------------

    def execute(self, op: Op, space_id: str, deadline_s: float | None = None) -> Observed:
        kw: dict[str, Any] = {}
        if op.kind != "delete":
            kw = {"offset": op.lo * PAGE, "length": op.n * PAGE}
        if op.kind in ("grant", "revoke"):
            kw["client"] = op.client
        if op.kind == "grant":
            kw["access"] = op.access
        if deadline_s is not None:
            kw["deadline_s"] = deadline_s
        t0 = time.monotonic()
        try:
            out = self.owners[op.owner].call(space_id, op.kind, **kw)
        except OwnerError as exc:
            now = time.monotonic()
            return Observed(exc.kind, exc.message, elapsed=now - t0, done_at=now)
        now = time.monotonic()
        report = out if "clients" in out else None
        return Observed(seq=out["seq"], report=report, elapsed=now - t0, done_at=now)

    def history(self, owner: str, space_id: str, after_seq: int) -> list[dict[str, Any]]:
        reports: list[dict[str, Any]] = self.owners[owner].call(
            space_id, "revocations", after_seq=after_seq
        )["reports"]
        return reports

    def verify(
        self,
        op: Op,
        space_id: str,
        expect: Expect,
        seen: Observed,
        pids: dict[str, int],
        stopped: set[str],
    ) -> None:
        """Compares one call's outcome with the model's prediction, then checks the fenced."""
        what = f"{op}: expected {expect}, observed {seen}"
        self.note(f"  {op} -> {seen.error or 'ok'} in {seen.elapsed * 1000:.0f} ms")
        if expect.error is not None:
            self.check(seen.error == expect.error, what)
            return
        self.check(seen.error is None, what)
        report = seen.report
        if op.kind == "grant":
            report = None
            if self.world.space_of(space_id) is None:
                # Deleted by a call racing it: its downgrade report went with the space (the
                # outcome still shows in the sessions, fence count and kernel checks).
                self.note(f"  {op}: space deleted meanwhile, report not kept")
                for name, outcome in expect.outcomes.items():
                    if outcome not in (ACKED, "enforced"):
                        self.check_fenced(name, "", "(report gone with the space)", name in stopped)
            elif expect.in_history:
                assert seen.seq is not None
                found = self.history(op.owner, space_id, seen.seq - 1)
                found = [r for r in found if r["seq"] == seen.seq]
                self.check(len(found) == 1, f"{what}: no downgrade report {found}")
                report = found[0]
        if report is not None:
            self.check_report(op, expect, report, pids, stopped)

    def check_report(
        self,
        op: Op,
        expect: Expect,
        report: dict[str, Any],
        pids: dict[str, int],
        stopped: set[str],
    ) -> None:
        what = f"{op}: expected {expect}, report {report}"
        got = {c[0]: c[1] for c in report["clients"]}
        self.check(got == expect.outcomes, f"outcomes differ: {what}")
        self.check(report["cause"] == expect.cause, f"cause differs: {what}")
        self.check(report["revoked_bytes"] == expect.revoked, f"revoked bytes differ: {what}")
        for name, outcome, fence, pid, reason in report["clients"]:
            self.check(pid == pids[name], f"pid of {name} is {pid}, not {pids[name]}: {what}")
            if outcome in (ACKED, "enforced"):
                self.check(fence == "", f"{outcome} with a fence result: {what}")
            else:
                self.check_fenced(name, fence, reason, name in stopped)

    def check_fenced(self, name: str, fence: str, reason: str, stopped: bool) -> None:
        """The fence result agrees with the kernel. (fence "": the report is not to be had;
        the kernel then says which it was.)"""
        proc = self.procs[name]
        c = self.client(name)
        self.note(f"  fenced {name}: {fence}: {reason}")
        if not fence:
            alive = proc.proc.poll() is None
            reach = kernel_reach(proc.pid, self.files.values()) if alive else None
            nothing = reach is not None and all(r.nothing for r in reach.values())
            fence = "disconnected" if nothing else "killed"
        if fence == "killed":
            rc = self.wait_rc(proc)
            self.check(rc == -signal.SIGKILL, f"{name} fenced 'killed' but exited {rc}: {reason}")
            c.stopped = False
            return
        self.check(fence == "disconnected", f"{name} fenced {fence!r}: {reason}")
        self.check(proc.proc.poll() is None, f"{name} fenced 'disconnected' but dead: {reason}")
        reach = kernel_reach(proc.pid, self.files.values())
        self.check(reach is not None, f"{name} vanished")
        assert reach is not None
        for space_id, f in self.files.items():
            r = reach[f]
            self.check(
                r.nothing,
                lambda r=r, space_id=space_id: (
                    f"{name} fenced 'disconnected' still reaches {space_id}: readable "
                    f"{pages_str(r.readable)} writable {pages_str(r.writable)} fds {r.fds}: "
                    f"{reason}"
                ),
            )
        if stopped:
            os.kill(proc.pid, signal.SIGCONT)
            c.stopped = False
        # Running, it reads the Goodbye and drops everything.
        deadline = time.monotonic() + WAIT_S
        while True:
            reach = kernel_reach(proc.pid, self.files.values())
            if reach is None or all(r.absent for r in reach.values()):
                break
            if time.monotonic() > deadline:
                self.fail(f"{name}, fenced and running, still maps or holds a space: {reach}")
            time.sleep(0.02)

    def owner_op(self, op: Op) -> Expect:
        space_id = self.space_id(op.owner)
        if space_id is None:
            return Expect(error="not_found")
        pids = {c.name: c.pid for c in self.world.clients.values()}
        stopped = {c.name for c in self.world.clients.values() if c.stopped}
        self.sense()
        expect = self.world.run(op)
        seen = self.execute(op, space_id)
        self.verify(op, space_id, expect, seen, pids, stopped)
        return expect

    # -- settling and the invariants ------------------------------------------------------------

    def settle_and_check(self) -> None:
        self.check(self.daemon.proc.poll() is None, "the daemon died")
        world = self.world
        # The client's own view equals the model's, once pushes (raises) settle.
        pending = [
            (c, sid) for c in world.clients.values() if self.running(c) for sid in c.attached
        ]
        deadline = time.monotonic() + WAIT_S
        while pending:
            left = []
            for c, sid in pending:
                sp = world.space_of(sid)
                assert sp is not None
                readable, writable = sp.effective(c.name)
                if sid in c.read_only:
                    writable = set()  # a sealed read-only mapping sees rw grants as ro
                want = ranges_of(readable, writable)
                got = self.procs[c.name].ok("ranges", space=sid)["ranges"]
                if got != want:
                    left.append((c, sid, got, want))
            if not left:
                break
            if time.monotonic() > deadline:
                self.fail(
                    "client views differ from the model: "
                    + "; ".join(f"{c.name} on {s}: {g} != model {w}" for c, s, g, w in left)
                )
            pending = [(c, s) for c, s, _, _ in left]
            time.sleep(0.02)
        # The kernel's view of every client process.
        for c in world.clients.values():
            proc = self.procs[c.name]
            alive = proc.proc.poll() is None
            if c.state == DEAD or not alive:
                self.check(
                    not alive and c.state != LIVE,
                    f"{c.name}: model says {c.state}, the process is "
                    f"{'alive' if alive else 'dead'}",
                )
                continue
            reach = kernel_reach(proc.pid, self.files.values())
            self.check(reach is not None, f"{c.name} vanished")
            assert reach is not None
            for space_id, f in self.files.items():
                r = reach[f]
                sp = world.space_of(space_id)
                if c.state != LIVE or sp is None or space_id not in c.attached:
                    self.check(
                        r.absent,
                        f"{c.name} ({c.state}) is not attached to {space_id} but maps it "
                        f"({r.vmas} vma, readable {pages_str(r.readable)}) or holds {r.fds} fd",
                    )
                    continue
                may_r, may_w = sp.effective(c.name)
                self.check(
                    r.readable <= may_r and r.writable <= may_w,
                    f"{c.name} reaches beyond its access in {space_id}: readable "
                    f"{pages_str(r.readable - may_r)}, writable {pages_str(r.writable - may_w)} "
                    f"(model: r {pages_str(may_r)} w {pages_str(may_w)})",
                )
                self.check(
                    r.fds == 0 or (c.kind == "fd" and r.fds == 1),
                    f"{c.name} ({c.kind}) holds {r.fds} fd(s) of {space_id}",
                )
        # The broker's state equals the model's.
        owner = self.owners["A"].session
        for sp in world.spaces.values():
            if sp is None:
                continue
            grants = [
                (name, r.offset, r.length, r.access.name)
                for name, r in owner.list_grants(sp.space_id)
            ]
            want = [
                (name, o, n, lvl)
                for name in sorted(sp.readable)
                for o, n, lvl in ranges_of(sp.readable[name], sp.writable[name])
            ]
            self.check(grants == want, f"grants of {sp.space_id}: {grants} != model {want}")
            shared = owner.get_space(sp.space_id).shared_bytes
            self.check(
                shared == len(sp.shared) * PAGE,
                f"{sp.space_id} shares {shared} bytes, model {len(sp.shared) * PAGE}",
            )
            pins = sorted(
                (p.pin_id, p.client, p.range.offset, p.range.length)
                for p in owner.list_pins(sp.space_id)
            )
            want_pins = sorted(
                (i, holder, a * PAGE, (b - a) * PAGE) for i, (holder, a, b) in sp.pins.items()
            )
            self.check(pins == want_pins, f"pins of {sp.space_id}: {pins} != model {want_pins}")
        sessions = sorted(
            (s.client, s.pid, tuple(sorted(s.attached_spaces))) for s in self.sessions().values()
        )
        want_sessions = sorted(
            [(OWNER_NAMES[o], self.owners[o].pid, ()) for o in OWNERS]
            + [(c.name, c.pid, tuple(sorted(c.attached))) for c in world.live()]
        )
        self.check(sessions == want_sessions, f"sessions {sessions} != model {want_sessions}")
        fenced = owner.stats().fenced_total
        self.check(fenced == world.fences, f"fenced_total {fenced}, model {world.fences}")

    def step(self, text: str, body: Callable[[], None]) -> None:
        """One step: runs it, then settles and checks every invariant."""
        self.in_step = True
        self.steps += 1
        self.note(f"step {self.steps}: {text}")
        body()
        self.settle_and_check()
        self.in_step = False

    # -- setup -----------------------------------------------------------------------------------

    @initialize(
        kinds=kinds_st,
        shared_b=range_st,
        grants=st.lists(st.tuples(range_st, access_st), min_size=4, max_size=4),
    )
    def start(
        self, kinds: list[str], shared_b: tuple[int, int], grants: list[tuple[Any, str]]
    ) -> None:
        def body() -> None:
            for i, kind in enumerate(kinds):
                self.start_client(f"c{i}", kind)
            for owner in OWNERS:
                self.create_space(owner)
            self.owner_op(Op("share", "A", "", 0, PAGES))
            self.owner_op(Op("share", "B", "", *_clip(shared_b)))
            for i in range(len(kinds)):
                rng, access = grants[i]
                self.owner_op(Op("grant", "A", f"c{i}", *_clip(rng), access))
                self.attach_now(self.client(f"c{i}"), "A")

        self.step(f"start {kinds}", body)

    def start_client(self, name: str, kind: str) -> None:
        proc = ClientProc(self.daemon.runtime_dir, name)
        self.procs[name] = proc
        self.world.clients[name] = MClient(name, kind, proc.pid)

    def attach_now(self, c: MClient, owner: str) -> None:
        sp = self.world.spaces[owner]
        assert sp is not None
        out = self.procs[c.name].cmd(f"attach_{c.kind}", space=sp.space_id)
        if c.name not in sp.readable:
            self.check(
                not out.get("ok") and "holds no grant" in out.get("error", ""),
                f"{c.name} attached to {sp.space_id} without a grant: {out}",
            )
            return
        self.check(out.get("ok"), f"{c.name} could not attach to {sp.space_id}: {out}")
        want = ranges_of(*sp.effective(c.name))
        self.check(out["ranges"] == want, f"attach reply {out['ranges']} != model {want}")
        c.attached[sp.space_id] = False
        c.sealed[sp.space_id] = out.get("mode") == "sealed"
        if c.sealed[sp.space_id] and not sp.writable.get(c.name):
            c.read_only.add(sp.space_id)
        else:
            c.read_only.discard(sp.space_id)

    def sense(self) -> None:
        """What each live sealed VA client has present, from the kernel (a lie is judged by
        it): read before an owner call, which the model then predicts."""
        for c in self.world.live():
            sealed = [space_id for space_id, yes in c.sealed.items() if yes]
            c.present = {}
            if not sealed:
                continue
            reach = kernel_reach(c.pid, [self.files[x] for x in sealed if x in self.files])
            for space_id in sealed:
                found = reach.get(self.files.get(space_id, (0, 0))) if reach else None
                c.present[space_id] = set(found.readable) if found else set()

    # -- owner rules -----------------------------------------------------------------------------

    @rule(owner=owner_st, rng=range_st)
    def share(self, owner: str, rng: tuple[int, int]) -> None:
        op = Op("share", owner, "", *_clip(rng))
        self.step(str(op), lambda: self.owner_op(op))

    @rule(owner=owner_st, who=pick_st, rng=range_st, focus=st.booleans())
    def unshare(self, owner: str, who: int, rng: tuple[int, int], focus: bool) -> None:
        """focus: from a page a misbehaving client (stopped, lying) holds, if there is one."""
        odd = self.misbehaving()
        if focus and odd:
            op = self.held_range(owner, odd[who % len(odd)], rng, True)
            op = Op("unshare", op.owner, "", op.lo, op.n)
        else:
            op = Op("unshare", owner, "", *_clip(rng))
        self.step(str(op), lambda: self.owner_op(op))

    @precondition(lambda self: self.misbehaving())
    @rule(
        who=pick_st,
        rng=range_st,
        how=st.sampled_from(["revoke", "unshare", "cancelled_revoke", "grant_ro"]),
    )
    def lower_misbehaving(self, who: int, rng: tuple[int, int], how: str) -> None:
        """Takes access from a stopped or lying client (the rules above do it by chance; this
        makes sure it happens often): it must be fenced, and only it."""
        if how == "grant_ro":
            odd = self.misbehaving()
            op = self.held_range("A", odd[who % len(odd)], rng, True)
            self.grant(
                op.owner, sorted(self.world.clients).index(op.client), (op.lo, op.n), "ro", False
            )
        else:
            getattr(self, how)(owner="A", who=who, rng=rng, focus=True)

    def misbehaving(self) -> list[str]:
        """Live clients that will not comply: stopped, or lying about some space."""
        return sorted(c.name for c in self.world.live() if c.stopped or any(c.attached.values()))

    @rule(owner=owner_st, who=pick_st, rng=range_st, access=access_st, focus=st.booleans())
    def grant(self, owner: str, who: int, rng: tuple[int, int], access: str, focus: bool) -> None:
        """focus: the range lies in shared pages (else it is random, and may be refused)."""
        sp = self.world.spaces[owner]
        lo, n = _within(sp.shared, rng) if focus and sp else _clip(rng)
        op = Op("grant", owner, self.name_of(who), lo, n, access)
        self.step(str(op), lambda: self.owner_op(op))

    def held_range(self, owner: str, name: str, rng: tuple[int, int], focus: bool) -> Op:
        """A revoke of `name`; focus: starting on a page it holds, in the other owner's space
        if it holds nothing in this one (else random)."""
        lo, n = _clip(rng)
        if focus:
            other = OWNERS[1 - OWNERS.index(owner)]
            here, there = self.world.spaces[owner], self.world.spaces[other]
            if not (here and here.effective(name)[0]) and there and there.effective(name)[0]:
                owner = other
        sp = self.world.spaces[owner]
        held = sp.effective(name)[0] if sp else set()
        if focus and held:
            lo = sorted(held)[lo % len(held)]
            n = min(n, PAGES - lo)
        return Op("revoke", owner, name, lo, n)

    @rule(owner=owner_st, who=pick_st, rng=range_st, focus=st.booleans())
    def revoke(self, owner: str, who: int, rng: tuple[int, int], focus: bool) -> None:
        """focus: of what a client holds, a misbehaving one (stopped, lying) if there is one."""
        name = self.name_of(who)
        odd = self.misbehaving()
        if focus and odd:
            name = odd[who % len(odd)]
        op = self.held_range(owner, name, rng, focus)
        self.step(str(op), lambda: self.owner_op(op))

    def old_spaces(self) -> list[str]:
        """Owners whose space has lived a few steps (a delete resets a lot: not too often)."""
        return [o for o in OWNERS if self.steps - self.born.get(o, 0) >= SPACE_MIN_STEPS]

    @precondition(lambda self: self.old_spaces())
    @rule(owner=owner_st, rng=range_st)
    def delete(self, owner: str, rng: tuple[int, int]) -> None:
        """Deletes the owner's space; a new one takes its place (with `rng` shared)."""
        if owner not in self.old_spaces():
            owner = self.old_spaces()[0]

        def body() -> None:
            self.owner_op(Op("delete", owner))
            self.recreate()
            self.owner_op(Op("share", owner, "", *_clip(rng)))

        self.step(f"{owner}.delete", body)

    def recreate(self) -> None:
        for owner in OWNERS:
            if self.world.spaces[owner] is None:
                self.create_space(owner)

    def name_of(self, index: int) -> str:
        names = sorted(self.world.clients)
        return names[index % len(names)]

    @rule(owner=owner_st, who=pick_st, rng=range_st, focus=st.booleans())
    def cancelled_revoke(self, owner: str, who: int, rng: tuple[int, int], focus: bool) -> None:
        """A Revoke whose caller gives up after 50 ms: the revocation runs to its end anyway;
        a later call of the same space waits behind it; its report is kept. focus: of a
        misbehaving client, if there is one (a stopped one's outlives its caller)."""
        odd = self.misbehaving()
        name = odd[who % len(odd)] if focus and odd else self.name_of(who)
        op = self.held_range(owner, name, rng, True)

        def body() -> None:
            space_id = self.space_id(op.owner)
            assert space_id is not None
            seq0 = self.owners[op.owner].call(space_id, "seq")["seq"]
            pids = {c.name: c.pid for c in self.world.clients.values()}
            stopped = {c.name for c in self.world.clients.values() if c.stopped}
            self.sense()
            expect = self.world.run(op)
            seen = self.execute(op, space_id, deadline_s=CANCEL_AFTER_S)
            if seen.error != "deadline":
                # Done within 50 ms: only a revocation that waits for nothing can be.
                self.check(not expect.slow, f"{op} returned in {seen.elapsed:.3f} s: {seen}")
                self.verify(op, space_id, expect, seen, pids, stopped)
                return
            self.note(f"  {op} cancelled after {seen.elapsed * 1000:.0f} ms")
            barrier = self.execute(Op("revoke", op.owner, BARRIER_CLIENT, 0, 1), space_id)
            self.check(barrier.error is None, f"the call behind {op} failed: {barrier}")
            found = [
                r
                for r in self.history(op.owner, space_id, seq0)
                if barrier.seq is None or r["seq"] < barrier.seq
            ]
            if not expect.in_history:
                self.check(found == [], f"{op} (cancelled) left reports {found}; {expect}")
                return
            self.check(len(found) == 1, f"{op} (cancelled): reports {found}; {expect}")
            if expect.slow:
                self.check(found[0]["caller_gone"], f"{op} outlived its caller: {found[0]}")
            self.check_report(op, expect, found[0], pids, stopped)

        self.step(f"{op} cancelled after {CANCEL_AFTER_S} s", body)

    @rule(first=pair_op_st, second=pair_op_st, cross=st.booleans())
    def concurrent(self, first: Any, second: Any, cross: bool) -> None:
        """Two owner calls at once: on one space (ordered by its queue: the model finds which
        order explains what was seen) or on two spaces of two owners (independent)."""
        ops = []
        for (kind, who, rng, access), owner in zip(
            (first, second), ("A", "B") if cross else ("A", "A"), strict=True
        ):
            if kind == "delete":
                ops.append(Op("delete", owner))
            else:
                ops.append(Op(kind, owner, self.name_of(who), *_clip(rng), access))
        self.step(f"at once: {ops[0]} | {ops[1]}", lambda: self.run_pair(ops[0], ops[1]))

    def run_pair(self, op1: Op, op2: Op) -> None:
        pids = {c.name: c.pid for c in self.world.clients.values()}
        stopped = {c.name for c in self.world.clients.values() if c.stopped}
        space_ids = [self.space_id(op1.owner), self.space_id(op2.owner)]
        assert None not in space_ids
        histories = []
        for order in ((0, 1), (1, 0)):
            sim = copy.deepcopy(self.world)
            expects: dict[int, Expect] = {}
            for i in order:
                expects[i] = sim.run((op1, op2)[i])
            histories.append((order, sim, expects))
        if op1.owner != op2.owner and (
            histories[0][1].key() != histories[1][1].key() or histories[0][2] != histories[1][2]
        ):
            # Their effects meet (a fence in one space drops grants in the other): in parallel
            # the outcome would hang on timing, so these two run one after the other.
            self.note("  (dependent across spaces: one after the other)")
            self.owner_op(op1)
            self.owner_op(op2)
            self.recreate()
            return
        gate = threading.Barrier(2, timeout=10)

        def call(op: Op, space_id: str) -> Observed:
            gate.wait()
            return self.execute(op, space_id)

        assert space_ids[0] is not None and space_ids[1] is not None
        threads = [
            _thread(lambda: call(op1, space_ids[0])),
            _thread(lambda: call(op2, space_ids[1])),
        ]
        seen = [_join(t, box) for t, box in threads]
        candidates = []
        for order, sim, expects in histories:
            if any(expects[i].error != seen[i].error for i in (0, 1)):
                continue
            seqs = [seen[i].seq for i in order]
            if op1.owner == op2.owner and None not in seqs and seqs[0] > seqs[1]:
                continue
            candidates.append((order, sim, expects))
        self.check(
            candidates,
            f"no order of {op1} | {op2} explains {seen}: predicted "
            f"{[(o, e) for o, _, e in histories]}",
        )
        keys = {repr(sim.key()) for _, sim, _ in candidates}
        self.check(len(keys) == 1, f"{op1} | {op2}: ambiguous order for {seen}")
        order, sim, expects = candidates[0]
        self.note(f"  order: {[str((op1, op2)[i]) for i in order]}")
        self.world = sim
        for i in order:
            op = (op1, op2)[i]
            self.verify(op, space_ids[i], expects[i], seen[i], pids, stopped)
        self.recreate()

    # -- races ---------------------------------------------------------------------------------

    def has_pinning_client(self) -> bool:
        return any(
            holder and self.running(self.client(holder))
            for sp in self.world.spaces.values()
            if sp
            for holder, _, _ in sp.pins.values()
        )

    @precondition(lambda self: self.has_pinning_client())
    @rule(index=pick_st, unshare=st.booleans())
    def revoke_racing_unpin(self, index: int, unshare: bool) -> None:
        """A revocation over a pinned range waits; the client unpins 0.15 s later (inside the
        deadline); the revocation then goes through and the client is acknowledged."""
        pinned = [
            (owner, sp, pin_id, holder, a, b)
            for owner, sp in self.world.spaces.items()
            if sp
            for pin_id, (holder, a, b) in sorted(sp.pins.items())
            if self.running(self.client(holder))
        ]
        owner, sp, _, holder, a, b = pinned[index % len(pinned)]
        op = Op("unshare" if unshare else "revoke", owner, holder, a, b - a)

        def body() -> None:
            pids = {c.name: c.pid for c in self.world.clients.values()}
            stopped = {c.name for c in self.world.clients.values() if c.stopped}
            release = [
                i for i, (h, lo, hi) in sorted(sp.pins.items()) if h == holder and lo < b and a < hi
            ]
            self.sense()
            t, box = _thread(lambda: self.execute(op, sp.space_id))
            time.sleep(RACE_AFTER_S)
            released_at = time.monotonic()
            for pin_id in release:
                self.procs[holder].ok("unpin", pin_id=pin_id)
                del sp.pins[pin_id]
            seen = _join(t, box)
            expect = self.world.run(op)
            if expect.error is None:
                self.check(
                    seen.done_at >= released_at,
                    f"{op} went through before the pin was released: {seen}",
                )
            self.verify(op, sp.space_id, expect, seen, pids, stopped)

        self.step(f"{op} racing an unpin", body)

    @precondition(lambda self: any(c.state == LIVE and c.stopped for c in self.world.live()))
    @rule(index=pick_st, owner=owner_st, rng=range_st, unshare=st.booleans())
    def revoke_racing_resume(
        self, index: int, owner: str, rng: tuple[int, int], unshare: bool
    ) -> None:
        """A revocation of a stopped client, which is resumed 0.15 s later: it acknowledges in
        time and is not fenced."""
        c = self.pick(index, lambda c: c.state == LIVE and c.stopped)
        assert c is not None
        op = self.held_range(owner, c.name, rng, True)
        if unshare:
            op = Op("unshare", op.owner, c.name, op.lo, op.n)

        def body() -> None:
            space_id = self.space_id(op.owner)
            assert space_id is not None
            pids = {x.name: x.pid for x in self.world.clients.values()}
            self.sense()
            t, box = _thread(lambda: self.execute(op, space_id))
            time.sleep(RACE_AFTER_S)
            resumed_at = time.monotonic()
            os.kill(c.pid, signal.SIGCONT)
            c.stopped = False
            seen = _join(t, box)
            stopped = {x.name for x in self.world.clients.values() if x.stopped}
            expect = self.world.run(op)
            if expect.outcomes.get(c.name) == ACKED:
                self.check(
                    seen.done_at >= resumed_at,
                    f"{op} returned before stopped {c.name} could acknowledge: {seen}",
                )
            self.verify(op, space_id, expect, seen, pids, stopped)

        self.step(f"{op} racing a SIGCONT of {c.name}", body)

    # -- client rules ----------------------------------------------------------------------------

    @rule(index=pick_st, owner=owner_st)
    def attach(self, index: int, owner: str) -> None:
        sp = self.world.spaces[owner]
        space_id = sp.space_id if sp else None
        free = [c for c in self.world.clients.values() if self.running(c)]
        free = [c for c in free if space_id not in c.attached]
        # Mostly clients that hold a grant there; now and then one without (it is refused).
        granted = [c for c in free if sp and c.name in sp.readable]
        choice = granted if granted and index % 4 else free
        if not choice:
            return
        c = choice[index % len(choice)]
        self.step(f"{c.name} attaches to {owner}", lambda: self.attach_now(c, owner))

    @rule(index=pick_st, owner=owner_st)
    def detach(self, index: int, owner: str) -> None:
        space_id = self.space_id(owner)
        c = self.pick(index, lambda c: self.running(c) and space_id in c.attached)
        if c is None or space_id is None:
            return

        def body() -> None:
            self.procs[c.name].ok("close", space=space_id)
            self.world.detach(c.name, space_id)

        self.step(f"{c.name} detaches from {owner}", body)

    def pins_elsewhere(self, c: MClient, space_id: str | None) -> bool:
        """Pin ids are per space, and client_proc keys pins by id alone: one space at a time."""
        return any(
            holder == c.name
            for sp in self.world.spaces.values()
            if sp and sp.space_id != space_id
            for holder, _, _ in sp.pins.values()
        )

    @rule(index=pick_st, owner=owner_st, rng=range_st)
    def pin(self, index: int, owner: str, rng: tuple[int, int]) -> None:
        sp = self.world.spaces[owner]
        space_id = sp.space_id if sp else None
        c = self.pick(
            index,
            lambda c: (
                self.running(c)
                and c.kind == "fd"
                and space_id in c.attached
                and not self.pins_elsewhere(c, space_id)
            ),
        )
        if c is None or sp is None:
            return
        # Mostly a range it holds; now and then a random one (refused unless held).
        lo, n = _within(sp.effective(c.name)[0], rng) if index % 4 else _clip(rng)

        def body() -> None:
            out = self.procs[c.name].cmd(
                "pin", space=sp.space_id, offset=lo * PAGE, length=n * PAGE
            )
            may_read, _ = sp.effective(c.name)
            if set(range(lo, lo + n)) <= may_read:
                self.check(out.get("ok"), f"{c.name} could not pin what it holds: {out}")
                sp.pins[out["pin_id"]] = (c.name, lo, lo + n)
            else:
                self.check(
                    not out.get("ok") and "FailedPrecondition" in out.get("error", ""),
                    f"{c.name} pinned [{lo},{lo + n}) beyond its access: {out}",
                )

        self.step(f"{c.name} pins [{lo},{lo + n}) of {owner}", body)

    @precondition(lambda self: self.has_pinning_client())
    @rule(index=pick_st)
    def unpin(self, index: int) -> None:
        pinned = [
            (sp, pin_id, holder)
            for sp in self.world.spaces.values()
            if sp
            for pin_id, (holder, _, _) in sorted(sp.pins.items())
            if self.running(self.client(holder))
        ]
        sp, pin_id, holder = pinned[index % len(pinned)]

        def body() -> None:
            self.procs[holder].ok("unpin", pin_id=pin_id)
            del sp.pins[pin_id]

        self.step(f"{holder} unpins {pin_id}", body)

    @precondition(lambda self: len(self.world.live()) >= 2)
    @rule(index=pick_st)
    def kill(self, index: int) -> None:
        c = self.pick(index, lambda c: self.procs[c.name].proc.poll() is None)
        if c is None:
            return

        def body() -> None:
            proc = self.procs[c.name]
            os.kill(proc.pid, signal.SIGKILL)
            self.check(self.wait_rc(proc) == -signal.SIGKILL, f"{c.name} survived SIGKILL")
            c.stopped = False
            if c.state == LIVE:
                self.wait_session_gone(proc.pid)
                self.world.end_session(c.name, DEAD)

        self.step(f"SIGKILL {c.name}", body)

    @rule(index=pick_st)
    def stop(self, index: int) -> None:
        """Mostly a client attached somewhere (a revocation will find it frozen)."""
        running = [c for c in self.world.clients.values() if self.running(c)]
        attached = [c for c in running if c.attached]
        choice = attached if attached and index % 4 else running
        if not choice:
            return
        c = choice[index % len(choice)]

        def body() -> None:
            stop_process(c.pid)
            c.stopped = True

        self.step(f"SIGSTOP {c.name}", body)

    @precondition(lambda self: any(c.stopped for c in self.world.clients.values()))
    @rule(index=pick_st)
    def cont(self, index: int) -> None:
        c = self.pick(index, lambda c: c.stopped)
        assert c is not None

        def body() -> None:
            os.kill(c.pid, signal.SIGCONT)
            c.stopped = False

        self.step(f"SIGCONT {c.name}", body)

    @rule(index=pick_st, owner=owner_st)
    def lie(self, index: int, owner: str) -> None:
        space_id = self.space_id(owner)
        c = self.pick(
            index, lambda c: self.running(c) and c.kind == "va" and space_id in c.attached
        )
        if c is None or space_id is None:
            return

        def body() -> None:
            self.procs[c.name].ok("lie", space=space_id)
            c.attached[space_id] = True

        self.step(f"{c.name} lies about {owner}", body)

    @rule(index=pick_st, owner=owner_st, fault=st.booleans(), page=st.integers(0, PAGES - 1))
    def touch(self, index: int, owner: str, fault: bool, page: int) -> None:
        """A VA client touches a page through its raw mapping: one it holds reads, one it does
        not hold (never granted, or revoked and acknowledged) kills it (SIGBUS or SIGSEGV)."""
        sp = self.world.spaces[owner]
        space_id = sp.space_id if sp else None
        c = self.pick(
            index, lambda c: self.running(c) and c.kind == "va" and space_id in c.attached
        )
        if c is None or sp is None:
            return
        held, _ = sp.effective(c.name)
        pool = sorted(set(range(PAGES)) - held) if fault else sorted(held)
        target = pool[page % len(pool)] if pool else page

        def body() -> None:
            proc = self.procs[c.name]
            out = proc.cmd("touch", timeout=10, space=sp.space_id, offset=target * PAGE)
            if target in held:
                self.check(out.get("ok"), f"{c.name} could not read held page {target}: {out}")
                return
            self.check(
                # SIGBUS from the broker (sealed mode), SIGSEGV from a guard (cooperative)
                out.get("dead") and out.get("returncode") in (-signal.SIGSEGV, -signal.SIGBUS),
                f"{c.name} touched page {target} it does not hold and lived: {out}",
            )
            self.wait_session_gone(proc.pid)
            self.world.end_session(c.name, DEAD)

        self.step(f"{c.name} touches page {target} of {owner}", body)

    @precondition(lambda self: any(c.state != LIVE for c in self.world.clients.values()))
    @rule(index=pick_st)
    def restart(self, index: int) -> None:
        """A dead or fenced client's process is replaced by a new one with the same name."""
        c = self.pick(index, lambda c: c.state != LIVE)
        assert c is not None

        def body() -> None:
            old = self.procs[c.name]
            if old.proc.poll() is None:
                os.kill(old.pid, signal.SIGCONT)
            old.close()
            self.check(old.proc.poll() is not None, f"old {c.name} did not exit")
            self.start_client(c.name, c.kind)

        self.step(f"restart {c.name}", body)

    # -- the end ---------------------------------------------------------------------------------

    def final_checks(self) -> None:
        self.note("final checks")
        for c in self.world.clients.values():
            proc = self.procs[c.name]
            if proc.proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                c.stopped = False
        for c in self.world.clients.values():
            self.procs[c.name].close()
            self.check(self.procs[c.name].proc.poll() is not None, f"{c.name} did not exit")
            if c.state == LIVE:
                self.world.end_session(c.name, DEAD)
        owners = {self.owners[o].pid: OWNER_NAMES[o] for o in OWNERS}
        deadline = time.monotonic() + WAIT_S
        while {p: s.client for p, s in self.sessions().items()} != owners:
            if time.monotonic() > deadline:
                self.fail(f"sessions left: {self.sessions()}")
            time.sleep(0.02)
        for owner in OWNERS:
            if self.world.spaces[owner] is not None:
                self.owner_op(Op("delete", owner))
        fds = self._settled_fds()
        self.check(fds == self.baseline_fds, f"daemon fds {fds}, baseline {self.baseline_fds}")
        fenced = self.owners["A"].session.stats().fenced_total
        self.check(fenced == self.world.fences, f"fenced_total {fenced}, model {self.world.fences}")
        self.check(self.daemon.proc.poll() is None, "the daemon died")

    def teardown(self) -> None:
        if os.environ.get("MEMBROKER_MODEL_JOURNAL"):
            with open(os.environ["MEMBROKER_MODEL_JOURNAL"], "a") as f:
                f.write("\n".join(["=== example", *self.journal, ""]))
        ok = False
        try:
            if not self.in_step:
                self.final_checks()
                ok = True
        finally:
            rc = self._cleanup()
            if ok:
                log = self.daemon.log()
                assert rc == 0, f"membrokerd exited {rc}:\n{log[-3000:]}"
                assert "Traceback" not in log, log[-6000:]
                shutil.rmtree(self.tmp, ignore_errors=True)

    def _cleanup(self) -> int:
        """Ends every process this example started, by pid (stopped ones resumed first)."""
        for proc in self.procs.values():
            if proc.proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
            proc.close()
        for owner in self.owners.values():
            owner.close()
        return self.daemon.stop()


def test_revocation_model() -> None:
    machine: Any = RevocationModel
    chosen = os.environ.get("MEMBROKER_MODEL_SEED")
    if chosen:
        machine = seed(int(chosen))(type("SeededRevocationModel", (RevocationModel,), {}))
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("MEMBROKER_MODEL_SHRINK") == "1":
        phases.append(Phase.shrink)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("MEMBROKER_MODEL_EXAMPLES", "12")),
            stateful_step_count=int(os.environ.get("MEMBROKER_MODEL_STEPS", "40")),
            deadline=None,
            database=None,
            derandomize=not chosen,
            phases=phases,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )
