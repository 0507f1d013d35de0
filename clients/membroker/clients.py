"""Attached clients of a space: `VaClient` (maps it, follows pointers) and `FdClient` (fd+offset).

Both are created by `Session.attach_va` / `Session.attach_fd`. Their push handlers run on the
session's thread: by the time a revocation is acknowledged, a VaClient has zapped the pages
(`MADV_DONTNEED` + `PROT_NONE`), an FdClient has run the application's `on_revoke` callback and
forgotten its pins there. A later touch of a revoked page in a VaClient is a SIGSEGV: the intent.
A teardown that fails is never acknowledged: a VaClient whose mprotect/madvise fails, or an
FdClient whose `on_revoke` callback raises, makes the session refuse the revocation
(`RevokeRefused` with the reason), and the broker fences or reports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from membroker import protection
from membroker._sys import mman
from membroker._sys import uffd as sys_uffd
from membroker._sys.libc import KernelFeatureMissing
from membroker.errors import BrokerRestarting, MembrokerError, SessionClosed, TeardownFailed
from membroker.rangeset import RangeSet, shared_batch, touching
from membroker.session import Session
from membroker.types import Access, AccessRange, SpaceInfo, access_of
from membroker.v1 import broker_pb2 as pb
from membroker.v1 import session_pb2 as spb

log = logging.getLogger("membroker")

RevokeCallback = Callable[[list[AccessRange]], None]
# Share of the revoke deadline a VaClient waits for access() blocks before tearing down anyway.
GUARD_WAIT_SHARE = 0.6
# A sealed client's teardown of at least this many ranges zaps around what it still holds
# instead of range by range, when that takes fewer calls (`VaClient._zap_spans`).
ZAP_AROUND_MIN = 64


_SEALED_AVAILABLE: bool | None = None


def sealed_mode_available() -> bool:
    """Whether this kernel offers what sealed VA mode needs (userfaultfd with minor and
    missing faults and write-protection on shmem, poison, and mseal). Asked once."""
    global _SEALED_AVAILABLE
    if _SEALED_AVAILABLE is None:
        features = sys_uffd.Uffd.available_features()
        _SEALED_AVAILABLE = (features & sys_uffd.FEATURES_SEALED) == sys_uffd.FEATURES_SEALED
        if _SEALED_AVAILABLE:
            # Offered is not permitted: fork events need CAP_SYS_PTRACE, so a process without
            # it (in a container, say) cannot seal and attaches cooperatively instead.
            try:
                sys_uffd.Uffd.create(sys_uffd.FEATURES_SEALED).close()
            except OSError:
                _SEALED_AVAILABLE = False
        if _SEALED_AVAILABLE:
            _SEALED_AVAILABLE = sys_uffd.mseal_available()
    return _SEALED_AVAILABLE


class SealRefused(MembrokerError):
    """The broker refused this client's sealed mapping (and fences the session): why."""

    def __init__(self, space_id: str, reason: str) -> None:
        super().__init__(f"sealed mapping of {space_id} refused: {reason}")
        self.space_id = space_id
        self.reason = reason


class NotHeld(MembrokerError):
    """The range asked for is not (or no longer) accessible to this client."""

    def __init__(self, offset: int, length: int, needed: Access) -> None:
        super().__init__(f"range {offset:#x}+{length:#x} is not held with {needed.name} access")
        self.offset = offset
        self.length = length
        self.needed = needed


class _Attachment:
    """What both client kinds share: attach/detach and the local view of effective access."""

    kind: pb.AttachKind
    # Whether the application's on_revoke callback is the teardown itself (FdClient): then its
    # exception means "not torn down". A VaClient's callback is a notification only.
    _callback_is_teardown: bool = False

    def __init__(self, session: Session, space_id: str, on_revoke: RevokeCallback | None) -> None:
        self.session = session
        self.space_id = space_id
        self._user_on_revoke = on_revoke
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        # access() blocks in progress (offset, end, write) and ranges a revoke waits to clear
        self._guards: list[tuple[int, int, bool]] = []
        # The byte ranges of each revocation waiting for access() blocks: no new block there.
        self._revoking: list[RangeSet] = []
        self._closed = False
        self.seq = 0
        # Why this attachment was dropped when its session resumed after a broker restart
        # (None: it was not; see `on_resumed`).
        self.dropped: str | None = None
        # Times this attachment was re-bound after its session resumed.
        self.resumed = 0
        # Called (on the resume thread) after each re-bind: what the application told the
        # broker about this attachment, the new daemon does not know yet.
        self.on_rebound: Callable[[], None] | None = None
        session._expect(space_id)
        attached = False
        try:
            resp = session.call(
                "Attach",
                pb.AttachRequest(space_id=space_id, kind=self.kind, va_mode=self._va_mode()),
            )
            attached = True
            self.info = SpaceInfo.from_pb(resp.space)
            self.page_size = self.info.page_size
            self._readable = RangeSet()
            self._writable = RangeSet()
            # Whether the broker handed a read-write description (only to rw grantees).
            self.writable_fd = resp.writable
            fd = session.take_fd(resp.fd_tag)
            self._adopt_fd(fd, resp)
        except BaseException:
            session._uninstall(space_id)
            if attached and not session.closed:
                # Attached at the broker, but not usable here: let go of it there too.
                with contextlib.suppress(MembrokerError):
                    session.call("Detach", pb.DetachRequest(space_id=space_id))
            raise
        self.seq = resp.seq
        try:
            if resp.ranges_on_session:
                # Too many ranges for the reply: they came on the session socket, before it.
                initial = session._take_snapshot(space_id, resp.seq)
            else:
                initial = [access_of(r) for r in resp.ranges]
            self.on_access_update(resp.seq, initial)
            session._install(space_id, self, resp.seq)
        except BaseException:
            session._uninstall(space_id)
            with self._lock:
                self._release()
            with contextlib.suppress(MembrokerError):
                session.call("Detach", pb.DetachRequest(space_id=space_id))
            raise

    def _va_mode(self) -> pb.VaMode:
        return pb.VA_MODE_UNSPECIFIED

    def _adopt_fd(self, fd: int, resp: pb.AttachResponse) -> None:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return self.info.size

    def _pages(self, offset: int, length: int) -> tuple[int, int]:
        return offset // self.page_size, (offset + length) // self.page_size

    def ranges(self) -> list[AccessRange]:
        """The effective access this client holds now, coalesced."""
        with self._lock:
            out = []
            for start, end in self._readable:
                cursor = start
                for ws, we in self._writable.intersection(start, end):
                    if cursor < ws:
                        out.append(self._range(cursor, ws, Access.RO))
                    out.append(self._range(ws, we, Access.RW))
                    cursor = we
                if cursor < end:
                    out.append(self._range(cursor, end, Access.RO))
            return out

    def _range(self, start: int, end: int, access: Access) -> AccessRange:
        return AccessRange(start * self.page_size, (end - start) * self.page_size, access)

    def holds(self, offset: int, length: int, access: Access = Access.RO) -> bool:
        if length <= 0 or offset < 0 or offset + length > self.size:
            return False
        first, last = offset // self.page_size, -(-(offset + length) // self.page_size)
        with self._lock:
            held = self._writable if access is Access.RW else self._readable
            return held.covers(first, last)

    def _record_all(self, ranges: list[AccessRange]) -> None:
        """Records new access levels, each set changed in one pass (ranges sorted by the
        broker; a million of them cost one copy of the sets, not a million array moves)."""
        none: list[tuple[int, int]] = []
        ro: list[tuple[int, int]] = []
        rw: list[tuple[int, int]] = []
        for r in ranges:
            span = self._pages(r.offset, r.length)
            (none if r.access is Access.NONE else ro if r.access is Access.RO else rw).append(span)
        if none:
            gone = shared_batch(none)
            self._readable.remove_many(gone)
            self._writable.remove_many(gone)
        if ro:
            lowered = shared_batch(ro)
            self._readable.add_many(lowered)
            self._writable.remove_many(lowered)
        if rw:
            raised = shared_batch(rw)
            self._readable.add_many(raised)
            self._writable.add_many(raised)

    # -- push handler protocol (session thread) ------------------------------------------------

    def on_access_update(self, seq: int, ranges: list[AccessRange]) -> None:
        with self._lock:
            if self._closed:
                return
            self._record_all(ranges)
            self.seq = max(self.seq, seq)

    def on_revoke(
        self, seq: int, ranges: list[AccessRange], space_deleted: bool, deadline_ms: int = 0
    ) -> None:
        """Tears the ranges down; raises TeardownFailed when they are not (then no ack).

        The local view drops the ranges either way: nothing here claims what may be gone.
        """
        with self._lock:
            if self._closed:
                # Released already (closed, space deleted, session ended): nothing is held.
                self.seq = max(self.seq, seq)
                return
        failed: Exception | None = None
        if self._user_on_revoke is not None:
            try:
                self._user_on_revoke(ranges)
            except Exception as exc:
                if self._callback_is_teardown:
                    failed = exc
                else:
                    log.exception(
                        "on_revoke callback of %s failed; tearing down anyway", self.space_id
                    )
        with self._lock:
            self._wait_for_access_guards(ranges, deadline_ms)
            self._record_all(ranges)
            try:
                if failed is None:
                    self._teardown(ranges)
            except Exception as exc:
                raise TeardownFailed(
                    self.space_id,
                    seq,
                    f"tearing down {len(ranges)} range(s) of {self.space_id} failed: "
                    f"{type(exc).__name__}: {exc}",
                ) from exc
            finally:
                self.seq = max(self.seq, seq)
                if space_deleted:
                    self._release()
        if failed is not None:
            raise TeardownFailed(
                self.space_id,
                seq,
                f"on_revoke of {self.space_id} raised {type(failed).__name__}: {failed}",
            ) from failed

    def _teardown(self, ranges: list[AccessRange]) -> None:
        raise NotImplementedError

    def _wait_for_access_guards(self, ranges: list[AccessRange], deadline_ms: int) -> None:
        """Lets `access()` blocks over the ranges finish first (called with the lock held).

        Waits at most GUARD_WAIT_SHARE of the broker's deadline, leaving the rest for the
        teardown and the acknowledgement; a block still running then loses the pages (and
        faults if it touches them) rather than have this client fenced.
        """

        if not self._guards:
            return
        # The revoked bytes as sets, made once (a revocation may carry a million ranges, and
        # the check runs again each time a block exits): every range, which a write block
        # conflicts with, and those that lose all access, which any block conflicts with.
        changed = RangeSet((r.offset, r.end) for r in ranges if r.length > 0)
        gone = RangeSet(
            (r.offset, r.end) for r in ranges if r.length > 0 and r.access is Access.NONE
        )

        def conflicts() -> bool:
            return any(
                (changed if write else gone).overlaps(start, end)
                for start, end, write in self._guards
            )

        if not conflicts():
            return
        self._revoking.append(changed)  # no new block over these ranges meanwhile
        try:
            deadline = time.monotonic() + GUARD_WAIT_SHARE * (deadline_ms or 1000) / 1000
            while conflicts() and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            if conflicts():
                log.warning(
                    "access() block on %s still running at the revoke deadline: the "
                    "pages are torn down under it",
                    self.space_id,
                )
        finally:
            self._revoking = [waiting for waiting in self._revoking if waiting is not changed]

    def on_unpin_request(self, ranges: list[tuple[int, int]]) -> None:
        """A revocation waits for this client's pins in `ranges` (FdClient acts on it)."""

    def on_session_closed(self, reason: str) -> None:
        with self._lock:
            self._release()

    # -- resuming (the session's resume thread) ---------------------------------------------

    def _resume_request(self) -> pb.AttachRequest:
        return pb.AttachRequest(
            space_id=self.space_id,
            kind=self.kind,
            va_mode=self._va_mode(),
            resume=True,
            writable=bool(self.writable_fd),
        )

    def on_resumed(self) -> None:
        """After the session resumed (the broker restarted or upgraded): re-binds this
        attachment without attaching again. The broker pushes what this client holds now and
        revokes the rest (the handler applies both as usual: the mapping or the fd is kept,
        torn down where the grants no longer stand), verifies, and answers. If the broker
        cannot re-bind it (the space is gone, a sealed mapping, a policy), this client drops
        what it maps and `dropped` says why; the application attaches again if it wants."""
        with self._lock:
            if self._closed:
                return
            self._forget_broker_state()
        try:
            resp = self.session.call("Attach", self._resume_request())
        except BrokerRestarting:
            raise
        except MembrokerError as exc:
            self._drop(f"could not be resumed: {exc}")
            return
        with self._lock:
            self.seq = max(self.seq, resp.seq)
            self.resumed += 1
        log.info("%s: attachment resumed at seq %d", self.space_id, resp.seq)
        if self.on_rebound is not None:
            try:
                self.on_rebound()
            except BrokerRestarting:
                raise
            except Exception:
                log.exception("%s: the re-bind callback failed", self.space_id)

    def _forget_broker_state(self) -> None:
        """What the broker forgot in its restart (called with the lock held)."""

    def _drop(self, reason: str) -> None:
        log.warning("%s: attachment dropped: %s", self.space_id, reason)
        self.session._uninstall(self.space_id)
        with self._lock:
            self.dropped = reason
            self._release()

    def _release(self) -> None:
        raise NotImplementedError

    # -- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops using the space (tearing down first), then detaches."""
        with self._lock:
            if self._closed:
                return
            self._release()
        self.session._uninstall(self.space_id)
        with contextlib.suppress(SessionClosed):
            self.session.call("Detach", pb.DetachRequest(space_id=self.space_id))

    def __enter__(self) -> _Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VaClient(_Attachment):
    """Maps the whole space once, PROT_NONE, and opens exactly the ranges it holds.

    Pages it does not hold fault on touch: PROT_NONE, or guard markers inside a 2 MiB chunk
    where it holds something (see membroker.protection: fragmented grants cost no VMAs).

    `view(offset, length)` returns a zero-copy memoryview into the mapping. After a revoke the
    same memoryview still points at the (now unreachable) pages: touching it kills the process
    with SIGSEGV, which is how a stray pointer in a backend is kept from corrupting the guest.

    The optional `on_revoke(ranges)` callback is told before the teardown; if it raises, that
    is logged and the teardown happens anyway. If the teardown itself fails (a syscall
    error), the revocation is refused rather than acknowledged.
    """

    kind = pb.ATTACH_KIND_VA

    def __init__(
        self,
        session: Session,
        space_id: str,
        on_revoke: RevokeCallback | None,
        mode: str = "auto",
    ) -> None:
        if mode not in ("auto", "sealed", "cooperative"):
            raise ValueError(f"mode must be 'auto', 'sealed' or 'cooperative', not {mode!r}")
        if mode == "sealed" and not sealed_mode_available():
            raise KernelFeatureMissing(
                "sealed VA mode", "this kernel lacks mseal or userfaultfd minor faults on shmem"
            )
        self._mode = mode
        self.sealed = False
        super().__init__(session, space_id, on_revoke)

    def _va_mode(self) -> pb.VaMode:
        if self._mode == "cooperative" or (self._mode == "auto" and not sealed_mode_available()):
            return pb.VA_MODE_COOPERATIVE
        return pb.VA_MODE_SEALED

    @property
    def mode(self) -> str:
        """'sealed' (the kernel keeps the mapping to the grants) or 'cooperative'."""
        return "sealed" if self.sealed else "cooperative"

    def _adopt_fd(self, fd: int, resp: pb.AttachResponse) -> None:
        self._chunk_pages = max(1, protection.CHUNK_BYTES // self.page_size)
        self._use_guards = True
        self._guarded = RangeSet()
        self._cur_r = RangeSet()
        self._cur_w = RangeSet()
        self._map_writable = resp.writable
        if self._mode == "sealed" and resp.va_mode != pb.VA_MODE_SEALED:
            os.close(fd)
            raise KernelFeatureMissing(
                "sealed VA mode", f"the broker cannot offer it for {self.space_id} (see its log)"
            )
        if resp.va_mode == pb.VA_MODE_SEALED:
            self._adopt_sealed(fd, resp.writable)
            return
        try:
            # The broker's fd is only needed to map: keeping it open would let a later mmap
            # reopen access without the broker, so it is closed as soon as the mapping exists.
            self.mapping = mman.Mapping.map_shared(fd, self.info.size, mman.PROT_NONE)
        finally:
            os.close(fd)
        # Telling the broker where lets it verify revokes with a few targeted questions.
        self.session._send(
            spb.Frame(
                mapped=spb.Mapped(
                    space_id=self.space_id, address=self.mapping.address, length=self.info.size
                )
            )
        )

    def _adopt_sealed(self, fd: int, writable: bool) -> None:
        """Maps the whole space (read-write if the fd allows), hands a userfaultfd for it to
        the broker, drops the fd, seals the mapping, and waits for the broker's check. From
        then on the broker maps in each page on first touch, if it is held."""
        uffd = None
        try:
            prot = mman.PROT_READ | (mman.PROT_WRITE if writable else 0)
            self.mapping = mman.Mapping.map_shared(fd, self.info.size, prot)
            os.close(fd)
            fd = -1
            uffd = sys_uffd.Uffd.create()
            self.mapping.seal()
            self._send_sealed(uffd)
        finally:
            if fd >= 0:
                os.close(fd)
            if uffd is not None:
                uffd.close()
        error = self.session._wait_sealed(self.space_id)
        if error:
            raise SealRefused(self.space_id, error)
        self.sealed = True

    def _send_sealed(self, uffd: sys_uffd.Uffd) -> None:
        """Reports the sealed mapping of the whole space, with the userfaultfd made for it."""
        sealed = spb.Sealed(
            space_id=self.space_id, address=self.mapping.address, length=self.info.size
        )
        self.session._send(spb.Frame(sealed=sealed), [uffd.fd])

    def __repr__(self) -> str:
        return (
            f"<VaClient {self.space_id} ({self.mode}) at {self.mapping.address:#x} seq={self.seq} "
            f"held={len(self._readable)} range(s)>"
        )

    @property
    def address(self) -> int:
        return self.mapping.address

    def _resume_request(self) -> pb.AttachRequest:
        req = super()._resume_request()
        req.va_mode = pb.VA_MODE_SEALED if self.sealed else pb.VA_MODE_COOPERATIVE
        req.address = self.mapping.address
        return req

    def on_resumed(self) -> None:
        """Cooperative: see `_Attachment.on_resumed`. Sealed: the mapping's userfaultfd ended
        with the previous daemon, so until it has a new one its pages fault in unchecked:
        every page is zapped first, then a new userfaultfd goes to the broker, which checks
        and registers the mapping as at the first attach, then re-synchronises it."""
        if not self.sealed:
            super().on_resumed()
            return
        with self._lock:
            if self._closed:
                return
        try:
            resp = self.session.call("Attach", self._resume_request())
            uffd = sys_uffd.Uffd.create()
            try:
                with self._lock:
                    self.mapping.discard(0, self.info.size)
                self._send_sealed(uffd)
            finally:
                uffd.close()
            error = self.session._wait_sealed(self.space_id)
        except BrokerRestarting:
            raise
        except (MembrokerError, OSError) as exc:
            self._drop(f"could not be resumed: {exc}")
            return
        if error:
            self._drop(f"its sealed mapping was refused at the resume: {error}")
            return
        with self._lock:
            self.seq = max(self.seq, resp.seq)
            self.resumed += 1
        log.info("%s: sealed attachment resumed at seq %d", self.space_id, resp.seq)

    def on_access_update(self, seq: int, ranges: list[AccessRange]) -> None:
        with self._lock:
            if self._closed:
                return
            super().on_access_update(seq, ranges)
            self._apply(ranges)

    def _teardown(self, ranges: list[AccessRange]) -> None:
        if not self._closed:
            self._apply(ranges)

    def on_new_fd(self, fd: int) -> None:
        """The broker upgraded this attachment to a read-write description (its first rw
        grant). Cooperative: the mapping is replaced in place by one of the new fd and what is
        held is opened again, before the update that raises it arrives. Sealed: a sealed
        mapping cannot be replaced; it stays read-only (attach again to write)."""
        try:
            with self._lock:
                if self.sealed or self._closed:
                    return
                self.mapping.remap(fd)
                self._guarded = RangeSet()
                self._cur_r = RangeSet()
                self._cur_w = RangeSet()
                self._map_writable = True
                self.writable_fd = True
                held = self.ranges()
                if held:
                    self._apply_cooperative(held)
        finally:
            os.close(fd)

    def _record_all(self, ranges: list[AccessRange]) -> None:
        if not self._map_writable and any(r.access is Access.RW for r in ranges):
            # Attached without a rw grant to a sealed, read-only mapping (for good): a rw grant
            # reads as ro here; detach and attach again to write. (A cooperative one is
            # upgraded in place first: on_new_fd.)
            log.warning(
                "%s: a read-write grant arrived, but this attachment's mapping is read-only; "
                "attach again to write",
                self.space_id,
            )
            ranges = [
                AccessRange(r.offset, r.length, Access.RO) if r.access is Access.RW else r
                for r in ranges
            ]
        super()._record_all(ranges)

    def _apply(self, ranges: list[AccessRange]) -> None:
        if self.sealed:
            # The broker maps held pages in on touch and write-protects itself; what is no
            # longer readable is zapped here (a refault of it is refused).
            page = self.page_size
            spans = [
                (r.offset // page, -(-(r.offset + r.length) // page))
                for r in ranges
                if r.access is Access.NONE
            ]
            for first, last in self._zap_spans(spans):
                self.mapping.discard(first * page, (last - first) * page)
            return
        self._apply_cooperative(ranges)

    def _zap_spans(self, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """What to zap (MADV_DONTNEED) for these no-longer-readable page spans, sealed mode,
        called once they are recorded: the spans themselves, or, for a batch of many whose hull
        holds few of the ranges still readable, the gaps between those (every page there is
        held by nobody here, so none may be present: zapping it is what a revoke asks for, and
        a held page is never zapped). A revocation of a million fragments that leaves nothing
        held around them is then one madvise, not a million."""
        if len(spans) < ZAP_AROUND_MIN:
            return spans
        lo = min(first for first, _ in spans)
        hi = max(last for _, last in spans)
        enough = len(spans) // 2
        if len([iv for iv in self._readable.window(lo, enough) if iv[0] < hi]) >= enough:
            return spans  # as many held ranges in between: zapping around them is no cheaper
        return self._readable.missing(lo, hi)

    def _apply_cooperative(self, ranges: list[AccessRange]) -> None:
        """Makes the mapping match what is held, for the chunks the ranges touch.

        Order matters: first every page that must stop being reachable is guarded or lowered,
        then what is held is raised; a page is never more accessible than held, even briefly.
        """
        page = self.page_size
        total = self.info.size // page
        cp = self._chunk_pages
        # Re-plan each run of touched chunks once, however many ranges fall in it.
        touched = RangeSet()
        for r in ranges:
            first, last = r.offset // page, -(-(r.offset + r.length) // page)
            touched.add(first // cp * cp, min(total, -(-last // cp) * cp))
        spans = list(touched)
        for index, (first, last) in enumerate(spans):
            p = protection.plan(
                self._readable,
                self._writable,
                first,
                last,
                self._chunk_pages,
                total,
                self._use_guards,
            )
            if self._use_guards:
                try:
                    for gs, ge in p.guard:
                        new = self._guarded.missing(gs, ge)
                        for ms, me in new:
                            # Guard markers zap the pages too: no MADV_DONTNEED needed.
                            self.mapping.guard_install(ms * page, (me - ms) * page)
                        self._guarded.add_many(new)
                except KernelFeatureMissing:
                    # An older kernel: fall back to PROT_NONE for what is not held.
                    self._use_guards = False
                    self._apply_cooperative(
                        [
                            AccessRange(s * page, (e - s) * page, Access.NONE)
                            for s, e in spans[index:]
                        ]
                    )
                    return
            raised = []
            for rs, re_, prot in p.runs:
                for cs, ce, cur in self._current(rs, re_):
                    if cur == prot:
                        continue
                    if prot < cur or (prot == protection.PROT_READ and cur == protection.PROT_RW):
                        self.mapping.protect(cs * page, (ce - cs) * page, prot)
                        if prot == protection.PROT_NONE:
                            # mprotect keeps the pages mapped; drop them so none is present.
                            self.mapping.discard(cs * page, (ce - cs) * page)
                        self._set_current(cs, ce, prot)
                    else:
                        raised.append((cs, ce, prot))
            for cs, ce, prot in raised:
                self.mapping.protect(cs * page, (ce - cs) * page, prot)
                self._set_current(cs, ce, prot)
            for us, ue in p.unguard:
                gone = self._guarded.intersection(us, ue)
                for gs, ge in gone:
                    self.mapping.guard_remove(gs * page, (ge - gs) * page)
                self._guarded.remove_many(gone)

    def _current(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """The protection the mapping has now over pages [start, end), as runs."""
        out = []
        cursor = start
        for rs, re_ in self._cur_r.intersection(start, end):
            if cursor < rs:
                out.append((cursor, rs, protection.PROT_NONE))
            pos = rs
            for ws, we in self._cur_w.intersection(rs, re_):
                if pos < ws:
                    out.append((pos, ws, protection.PROT_READ))
                out.append((ws, we, protection.PROT_RW))
                pos = we
            if pos < re_:
                out.append((pos, re_, protection.PROT_READ))
            cursor = re_
        if cursor < end:
            out.append((cursor, end, protection.PROT_NONE))
        return out

    def _set_current(self, start: int, end: int, prot: int) -> None:
        if prot == protection.PROT_NONE:
            self._cur_r.remove(start, end)
        else:
            self._cur_r.add(start, end)
        if prot == protection.PROT_RW:
            self._cur_w.add(start, end)
        else:
            self._cur_w.remove(start, end)

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            self._readable = RangeSet()
            self._writable = RangeSet()
            self.mapping.close()

    @contextlib.contextmanager
    def access(self, offset: int, length: int, *, write: bool = False) -> Iterator[memoryview]:
        """`with va.access(off, n) as mem:` -- a revoke of that range waits for the block.

        The zap of the range is delayed until the block exits (bounded by the revoke deadline),
        so a well-behaved backend is never cut off in the middle of a request. NotHeld if the
        range is not held, or a revocation of it is already waiting.
        """
        needed = Access.RW if write else Access.RO
        with self._lock:
            if not self.holds(offset, length, needed):
                raise NotHeld(offset, length, needed)
            if any(waiting.overlaps(offset, offset + length) for waiting in self._revoking):
                raise NotHeld(offset, length, needed)
            guard = (offset, offset + length, write)
            self._guards.append(guard)
        try:
            yield self.mapping.view(offset, length)
        finally:
            with self._lock:
                self._guards.remove(guard)
                self._cv.notify_all()

    def view(self, offset: int, length: int, *, check: bool = True) -> memoryview:
        """A zero-copy view of held bytes (NotHeld if not held, unless check=False)."""
        if check and not self.holds(offset, length):
            raise NotHeld(offset, length, Access.RO)
        return self.mapping.view(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        """New bytes of [offset, offset+length); `readinto` copies into a buffer of yours."""
        if not self.holds(offset, length):
            raise NotHeld(offset, length, Access.RO)
        return self.mapping.read(offset, length)

    def readinto(self, offset: int, buffer: bytearray | memoryview) -> int:
        """Copies len(buffer) held bytes from `offset` into `buffer`: one copy, nothing new
        allocated (a backend's own request buffer, say); returns the count."""
        length = memoryview(buffer).nbytes
        if not self.holds(offset, length):
            raise NotHeld(offset, length, Access.RO)
        return self.mapping.readinto(offset, buffer)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copies `data` (any contiguous buffer) to `offset`: one copy."""
        length = memoryview(data).nbytes
        if not self.holds(offset, length, Access.RW):
            raise NotHeld(offset, length, Access.RW)
        self.mapping.write(offset, data)


class Pin:
    """A pinned range of an FdClient; a context manager that unpins on exit."""

    def __init__(
        self, client: FdClient, pin_id: int, offset: int, length: int, write: bool
    ) -> None:
        self.client = client
        self.pin_id = pin_id
        self.offset = offset
        self.length = length
        self.write = write
        self.released = False

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"<Pin {self.pin_id} {self.offset:#x}+{self.length:#x} {state}>"

    def unpin(self) -> None:
        self.client._unpin(self)

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpin()


class FdClient(_Attachment):
    """Holds the space's fd and uses it by offset; pins every range while it uses it.

    `on_revoke(ranges)` runs on the session thread before the acknowledgement: stop using the
    ranges there (delete the memslot, stop the DMA, unmap). Pins in revoked ranges are released
    by the acknowledgement itself. If it raises, the ranges count as still in use: the session
    refuses the revocation with the exception's message, and the broker fences this client.
    """

    kind = pb.ATTACH_KIND_FD
    _callback_is_teardown = True

    def _adopt_fd(self, fd: int, resp: pb.AttachResponse) -> None:
        self.fd = fd
        self._pins: dict[int, Pin] = {}
        self.on_unpin_requested: Callable[[list[tuple[int, int]]], None] | None = None

    def on_unpin_request(self, ranges: list[tuple[int, int]]) -> None:
        if self.on_unpin_requested is not None:
            self.on_unpin_requested(ranges)

    def on_new_fd(self, fd: int) -> None:
        """The broker upgraded this attachment to a read-write description (its first rw
        grant): the read-only one is closed. Mappings made from the old one stay read-only."""
        with self._lock:
            old, self.fd = self.fd, fd
            self.writable_fd = True
        os.close(old)

    def __repr__(self) -> str:
        return f"<FdClient {self.space_id} fd={self.fd} seq={self.seq} pins={len(self._pins)}>"

    def pin(self, offset: int, length: int, *, write: bool = False) -> Pin:
        """Declares a range in use; the broker refuses unless it is held (and not revoking)."""
        resp = self.session.call(
            "Pin",
            pb.PinRequest(
                space_id=self.space_id, range=spb.Range(offset=offset, length=length), write=write
            ),
        )
        pin = Pin(self, int(resp.pin_id), offset, length, write)
        with self._lock:
            self._pins[pin.pin_id] = pin
        return pin

    def _forget_broker_state(self) -> None:
        """Pins end with the broker process: the ones held here are released (the
        application pins again what it still uses)."""
        if self._pins:
            log.warning(
                "%s: %d pin(s) ended with the broker's restart", self.space_id, len(self._pins)
            )
        for pin in self._pins.values():
            pin.released = True
        self._pins.clear()

    def _unpin(self, pin: Pin) -> None:
        with self._lock:
            if pin.released or self._pins.pop(pin.pin_id, None) is None:
                pin.released = True
                return
            pin.released = True
        if not self.session.closed:
            self.session.call("Unpin", pb.UnpinRequest(space_id=self.space_id, pin_id=pin.pin_id))

    @property
    def pins(self) -> list[Pin]:
        with self._lock:
            return list(self._pins.values())

    def _teardown(self, ranges: list[AccessRange]) -> None:
        """Releases every pin that overlaps a revoked range."""
        if not self._pins:
            return
        # Many pins against a large revocation (a DMA engine's in-flight I/O against a million
        # ranges) are looked up in one set of the revoked bytes, not compared with each.
        for pin in touching(
            self._pins.values(),
            lambda pin: (pin.offset, pin.offset + pin.length),
            [(r.offset, r.end) for r in ranges],
        ):
            pin.released = True
            del self._pins[pin.pin_id]

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            for pin in self._pins.values():
                pin.released = True
            self._pins.clear()
            self._readable = RangeSet()
            self._writable = RangeSet()
            os.close(self.fd)
            self.fd = -1

    @contextlib.contextmanager
    def using(self, offset: int, length: int, *, write: bool = False) -> Iterator[Pin]:
        """`with client.using(off, n):` pins for the duration of the block."""
        pin = self.pin(offset, length, write=write)
        try:
            yield pin
        finally:
            pin.unpin()
