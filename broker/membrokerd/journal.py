"""The journal: what a restarted daemon needs to take its spaces back, on disk.

Two parts. The changes of the access tables (grants, revocations, the shared attribute, a
fence's drop), the hot path, go to a change log (`ChangeLog`, STATE_DIR/changes.N.log): one
checksummed record per change, appended by the event loop before the change is carried out, so
it is in the journal before the call that made it reports success, at the cost of one write(2)
and no thread hop. Everything else, and the log itself once a generation of it is full, goes to
one sqlite3 database (STATE_DIR/journal.sqlite) in WAL mode with `synchronous=NORMAL`, on the
journal's thread (`Writer`); a start folds the log a previous daemon left into the database
before it reads it. A crash of the daemon (kill -9, the watchdog, an upgrade gone wrong) leaves
every logged or committed change and none of a torn one: a record cut short ends its log, and
sqlite replays or drops the WAL tail on the next open.

Why not fsync every change (`synchronous=FULL`, ~150 us a commit here): what the journal
restores is only worth anything while the memory it describes exists, and that memory (memfd,
guest_memfd, hugetlbfs pages) and systemd's fd store that carries it across a restart live in
RAM. A power loss or kernel crash that could lose an unsynced WAL tail loses the spaces too,
and the next start drops every space row that comes back without its fd. The one record that
outlives the memory, a client name's binding to a uid, is committed with a full sync.

What it keeps, per space: the identity and layout of the space (id, name, size, backing, page
size, owner name and uid, imported, regions, dev/ino and seals of its backing, the access
table's seq), its shared pages, and each client's grant sets. Sets are stored as their
`array('Q')` columns (`tobytes()`), one row per client, never a row per fragment: a change to
one client rewrites that client's row only (a million fragments: 4 blobs, ~32 MB). Besides,
the client-name -> uid bindings (client_name_binding = uid), and one row per live session that
may be resumed after a restart (`SessionRecord`: the SHA-256 of its resume token, never the
token, with the client name, uid, pid and process start time it is bound to), and each space's
newest revocation reports (JSON; gathered and written together after the revocations ended,
not waited for: a crash can lose the last few). Not kept: attachments and pins (a resumed
session re-binds its attachments itself), and ephemeral spaces (they end with their owner's
session, which a restart ends).

The memory itself is not in the journal: its fd travels through systemd's fd store
(membrokerd.systemd.fd_store_add) and comes back in LISTEN_FDS.

The access table (membrokerd.access) has no serialisation of its own: `capture` and
`restore_table` read and set its fields here, in one place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import sqlite3
import stat
import struct
import threading
import zlib
from array import array
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from membroker.rangeset import RangeSet
from membrokerd.access import AccessTable, _Grants

log = logging.getLogger("membrokerd.journal")

T = TypeVar("T")

# 2: the change log (changes.N.log, meta.log_gen). A daemon that knows only 1 refuses such a
# journal rather than ignore a log it cannot read (and lose the changes in it).
SCHEMA_VERSION = 2
JOURNAL_FILE = "journal.sqlite"
LOCK_FILE = "journal.lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spaces (
    space_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    backing TEXT NOT NULL,
    page_size INTEGER NOT NULL,
    owner TEXT NOT NULL,
    owner_uid INTEGER NOT NULL,
    imported INTEGER NOT NULL,
    regions TEXT NOT NULL,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    seals INTEGER NOT NULL,
    created_unix REAL NOT NULL,
    seq INTEGER NOT NULL,
    shared_starts BLOB NOT NULL,
    shared_ends BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    space_id TEXT NOT NULL REFERENCES spaces(space_id) ON DELETE CASCADE,
    client TEXT NOT NULL,
    readable_starts BLOB NOT NULL,
    readable_ends BLOB NOT NULL,
    writable_starts BLOB NOT NULL,
    writable_ends BLOB NOT NULL,
    PRIMARY KEY (space_id, client)
);
CREATE TABLE IF NOT EXISTS ops (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id TEXT NOT NULL REFERENCES spaces(space_id) ON DELETE CASCADE,
    client TEXT NOT NULL,
    kind TEXT NOT NULL,
    starts BLOB NOT NULL,
    ends BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS ops_by_set ON ops (space_id, client);
CREATE TABLE IF NOT EXISTS names (client TEXT PRIMARY KEY, uid INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id TEXT NOT NULL REFERENCES spaces(space_id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    cause TEXT NOT NULL,
    report TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS revocations_by_space ON revocations (space_id, id);
CREATE TABLE IF NOT EXISTS sessions (
    token_sha256 TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    uid INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    created_unix REAL NOT NULL
);
"""


# What a failed journal write was: an append to the change log (or the start of its next
# generation), a fold of a generation into the database, or any other write of the database
# (a space, a session, a name binding, revocation reports).
WRITE_KINDS: Final = ("append", "fold", "write")


class JournalError(Exception):
    """The journal cannot be opened or read; the message says which file and why."""


@dataclasses.dataclass(frozen=True, slots=True)
class Sets:
    """A RangeSet as its two columns' bytes (native u64, as array('Q') stores them)."""

    starts: bytes
    ends: bytes

    @classmethod
    def of(cls, ranges: RangeSet) -> Sets:
        starts, ends = ranges.columns()
        return cls(starts.tobytes(), ends.tobytes())

    @classmethod
    def of_byte_spans(cls, spans: Iterable[tuple[int, int]], page_size: int) -> Sets:
        """Sorted, disjoint byte ranges (offset, length) as page spans; they may touch (a
        batch's ranges may)."""
        starts, ends = array("Q"), array("Q")
        for offset, length in spans:
            starts.append(offset // page_size)
            ends.append((offset + length) // page_size)
        return cls(starts.tobytes(), ends.tobytes())

    def __len__(self) -> int:
        return len(self.starts) // 8

    def columns(self, limit: int, touching: bool = False) -> tuple[array[int], array[int]]:
        """The columns again; JournalError unless they are well formed: as long as each other,
        sorted, disjoint (not touching either, unless `touching`), within [0, limit)."""
        if len(self.starts) != len(self.ends) or len(self.starts) % 8:
            raise JournalError("a stored range set has columns of different lengths")
        starts, ends = array("Q"), array("Q")
        starts.frombytes(self.starts)
        ends.frombytes(self.ends)
        if starts and ends[-1] > limit:
            raise JournalError(f"a stored range set ends at page {ends[-1]}, past {limit}")
        apart = int.__le__ if touching else int.__lt__
        if not all(map(int.__lt__, starts, ends)) or not all(map(apart, ends, starts[1:])):
            raise JournalError("a stored range set is not sorted and disjoint")
        return starts, ends

    def rangeset(self, limit: int) -> RangeSet:
        """The set again (see `columns`)."""
        return RangeSet.from_columns(*self.columns(limit))

    def spans(self, limit: int) -> list[tuple[int, int]]:
        starts, ends = self.columns(limit, touching=True)
        return list(zip(starts, ends, strict=True))


EMPTY = Sets(b"", b"")


@dataclasses.dataclass(frozen=True, slots=True)
class ClientSets:
    """One client's grant records: `readable` (RO and RW pages) and `writable` (RW pages)."""

    readable: Sets
    writable: Sets


@dataclasses.dataclass(frozen=True, slots=True)
class SpaceRecord:
    """What defines a space, as created or imported (none of it changes afterwards)."""

    space_id: str
    name: str
    size: int
    backing: str
    page_size: int
    owner: str
    owner_uid: int
    imported: bool
    regions: tuple[tuple[int, int, int], ...]  # (gpa, offset, size)
    dev: int
    ino: int
    seals: int  # F_GET_SEALS of the backing; -1 where it has none (guest_memfd)
    created_unix: float


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """One committed change of a space's access table: its seq after the change, and what
    changed as snapshots (the shared pages; the grant sets of clients, None: no grants left)
    or as operations to replay on the last snapshot (`ops`)."""

    space_id: str
    seq: int
    shared: Sets | None
    clients: dict[str, ClientSets | None]
    ops: tuple[Op, ...] = ()


# Operations: what a change did to one set, replayed on its snapshot at load.
GRANT_RO, GRANT_RW, REVOKE, SHARE, PRIVATE = "grant_ro", "grant_rw", "revoke", "share", "private"
OP_KINDS = (GRANT_RO, GRANT_RW, REVOKE, SHARE, PRIVATE)
# The key of the shared attribute's operations (a client name is never empty).
SHARED = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Op:
    """`kind` over page spans, of `client`'s grants (SHARED: of the shared attribute)."""

    client: str
    kind: str
    spans: Sets


@dataclasses.dataclass(slots=True)
class SpaceState:
    """A space as the journal has it."""

    record: SpaceRecord
    seq: int
    shared: Sets
    grants: dict[str, ClientSets]
    # Logged since the snapshots, in order.
    ops: list[Op] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class Contents:
    spaces: list[SpaceState]
    names: dict[str, int]
    sessions: list[SessionRecord] = dataclasses.field(default_factory=list)
    # space id -> its newest revocation reports (JSON, as the broker wrote them), oldest first
    revocations: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session that may be resumed: what its resume token is bound to."""

    token_sha256: str
    client: str
    uid: int
    pid: int
    # The process's start time (/proc/PID/stat field 22, clock ticks since boot): a pid
    # reused by another process after the first one exited does not match.
    start_time: int
    created_unix: float


# -- the access table, in and out --------------------------------------------------------------


def client_sets(table: AccessTable, client: str) -> ClientSets | None:
    """`client`'s grant records as bytes (a copy: the table may change right after)."""
    g = table._grants.get(client)
    if g is None:
        return None
    return ClientSets(Sets.of(g.readable), Sets.of(g.writable))


def capture(
    space_id: str, table: AccessTable, clients: Iterable[str] = (), shared: bool = False
) -> Change:
    """The change just committed to `table`, for the clients it touched (and the shared pages
    when `shared`): taken at once, on the thread that changed the table."""
    return Change(
        space_id,
        table.seq,
        Sets.of(table._shared) if shared else None,
        {client: client_sets(table, client) for client in clients},
    )


def restore_table(table: AccessTable, state: SpaceState) -> None:
    """Puts a journal's shared pages, grants and seq into a new, empty table: the snapshots,
    then the operations logged since, in order. (Grant records do not depend on the shared
    attribute, nor one client's on another's: each set replays on its own snapshot.)"""
    pages = table.size // table.page_size
    shared = state.shared.rangeset(pages)
    grants: dict[str, _Grants] = {}
    for client, sets in state.grants.items():
        g = grants[client] = _Grants()
        g.readable = sets.readable.rangeset(pages)
        g.writable = sets.writable.rangeset(pages)
    for op in state.ops:
        spans = op.spans.spans(pages)
        if op.kind == SHARE:
            shared.add_many(spans)
        elif op.kind == PRIVATE:
            shared.remove_many(spans)
        else:
            g = grants.get(op.client) or grants.setdefault(op.client, _Grants())
            if op.kind == REVOKE:
                g.readable.remove_many(spans)
                g.writable.remove_many(spans)
            else:
                g.readable.add_many(spans)
                if op.kind == GRANT_RW:
                    g.writable.add_many(spans)
                else:
                    g.writable.remove_many(spans)
    table._shared = shared
    for client, g in grants.items():
        if not g.readable:
            continue
        if g.writable.intersect(g.readable) != g.writable:
            raise JournalError(f"client {client!r}: writable pages that are not readable")
        table._grants[client] = g
    table._seq = state.seq


class Compaction:
    """Decides, where the table changed (on the loop), what a change writes: a set small
    enough is written whole (its snapshot); a large one gets its operation logged, and is
    written whole again once `max_ops` operations piled up on it (then its log is dropped).
    So a grant to a client holding a million fragments writes its few ranges, not 16 MB,
    except one grant in `max_ops`."""

    def __init__(self, small: int = 8192, max_ops: int = 256) -> None:
        self.small = small
        self.max_ops = max_ops
        # (space id, client or SHARED) -> operations logged since its snapshot
        self.logged: dict[tuple[str, str], int] = {}

    def change(
        self,
        space_id: str,
        table: AccessTable,
        key: str,
        kind: str,
        spans: Iterable[tuple[int, int]],
    ) -> Change:
        """The change `kind` over byte ranges `spans` ((offset, length), sorted, disjoint) just
        made to `key`'s set in `table`."""
        if key == SHARED:
            size = len(table._shared)
        else:
            g = table._grants.get(key)
            if g is None:
                self.logged.pop((space_id, key), None)
                return Change(space_id, table.seq, None, {key: None})
            size = len(g.readable) + len(g.writable)
        count = self.logged.get((space_id, key), 0)
        if size <= self.small or count >= self.max_ops:
            self.logged.pop((space_id, key), None)
            if key == SHARED:
                return Change(space_id, table.seq, Sets.of(table._shared), {})
            return Change(space_id, table.seq, None, {key: client_sets(table, key)})
        self.logged[(space_id, key)] = count + 1
        op = Op(key, kind, Sets.of_byte_spans(spans, table.page_size))
        return Change(space_id, table.seq, None, {}, (op,))

    def forget(self, space_id: str, table: AccessTable, client: str) -> Change:
        """`client` holds nothing in the space any more (fenced)."""
        self.logged.pop((space_id, client), None)
        return Change(space_id, table.seq, None, {client: client_sets(table, client)})

    def space_gone(self, space_id: str) -> None:
        for key in [k for k in self.logged if k[0] == space_id]:
            del self.logged[key]


def _apply(db: sqlite3.Connection, changes: Iterable[Change]) -> None:
    """The SQL of `Journal.apply`, inside its caller's transaction."""
    for change in changes:
        if change.shared is None:
            cur = db.execute(
                "UPDATE spaces SET seq = ? WHERE space_id = ?",
                (change.seq, change.space_id),
            )
        else:
            cur = db.execute(
                "UPDATE spaces SET seq = ?, shared_starts = ?, shared_ends = ? WHERE space_id = ?",
                (change.seq, change.shared.starts, change.shared.ends, change.space_id),
            )
        if cur.rowcount == 0:
            continue
        if change.shared is not None:
            db.execute(
                "DELETE FROM ops WHERE space_id = ? AND client = ?",
                (change.space_id, SHARED),
            )
        for op in change.ops:
            db.execute(
                "INSERT INTO ops (space_id, client, kind, starts, ends) VALUES (?,?,?,?,?)",
                (change.space_id, op.client, op.kind, op.spans.starts, op.spans.ends),
            )
        for client, sets in change.clients.items():
            db.execute(
                "DELETE FROM ops WHERE space_id = ? AND client = ?",
                (change.space_id, client),
            )
            if sets is None:
                db.execute(
                    "DELETE FROM grants WHERE space_id = ? AND client = ?",
                    (change.space_id, client),
                )
                continue
            db.execute(
                "INSERT OR REPLACE INTO grants VALUES (?,?,?,?,?,?)",
                (
                    change.space_id,
                    client,
                    sets.readable.starts,
                    sets.readable.ends,
                    sets.writable.starts,
                    sets.writable.ends,
                ),
            )


# -- the change log ------------------------------------------------------------------------------

LOG_PREFIX = "changes."
LOG_SUFFIX = ".log"
# A record: its payload's length, the CRC-32 of those four bytes, and the payload's CRC-32 (u32
# each, little-endian), then the payload. The length has a checksum of its own: a damaged one
# must not pass for a record cut short by a crash (which a start drops, with what follows it).
_RECORD = struct.Struct("<III")
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# A generation of the log is folded into the database once it holds this much: what a start
# replays, and what the journal's thread commits at a time.
LOG_FOLD_BYTES = 256 * 1024
# A change that writes more than this (a set of ~32,000 ranges written whole: a client of many
# fragments, once every `Compaction.max_ops` of its changes) is not appended on the loop
# (encoding, checksumming and writing 32 MB there take ~100 ms): `Writer.log_large`.
LARGE_CHANGE_BYTES = 1 << 20
# Generations whose fold failed keep their changes in memory up to this many; older ones whose
# file holds exactly their changes are read back from it at the next fold instead (a database
# that refuses folds for hours would otherwise hold every change made meanwhile in memory).
UNFOLDED_IN_MEMORY = 8
# One record's payload at most (a change of sets of 8,192 ranges is ~260 KB; a batch of a
# hundred thousand ranges logged as one operation, 1.6 MB): a length beyond it is damage.
MAX_RECORD_BYTES = 1 << 30


def log_path(directory: Path, gen: int) -> Path:
    return directory / f"{LOG_PREFIX}{gen}{LOG_SUFFIX}"


def _log_generation_of(name: str) -> int | None:
    if not (name.startswith(LOG_PREFIX) and name.endswith(LOG_SUFFIX)):
        return None
    digits = name[len(LOG_PREFIX) : -len(LOG_SUFFIX)]
    if not (digits.isascii() and digits.isdigit() and len(digits) < 20):
        return None
    gen = int(digits)
    return gen if str(gen) == digits else None  # the name log_path gives it, nothing else


def change_bytes(change: Change) -> int:
    """How many bytes of range sets a change writes."""
    total = 0
    for sets in (change.shared, *(op.spans for op in change.ops)):
        if sets is not None:
            total += len(sets.starts) + len(sets.ends)
    for client in change.clients.values():
        if client is not None:
            total += len(client.readable.starts) + len(client.readable.ends)
            total += len(client.writable.starts) + len(client.writable.ends)
    return total


def _put_blob(out: list[bytes], blob: bytes) -> None:
    out.append(_U32.pack(len(blob)))
    out.append(blob)


def _put_sets(out: list[bytes], sets: Sets) -> None:
    _put_blob(out, sets.starts)
    _put_blob(out, sets.ends)


def encode_changes(changes: Sequence[Change]) -> bytes:
    """Changes as one record's payload (`decode_changes` reads it back)."""
    out: list[bytes] = [_U32.pack(len(changes))]
    for change in changes:
        _put_blob(out, change.space_id.encode())
        out.append(_U64.pack(change.seq))
        if change.shared is None:
            out.append(b"\0")
        else:
            out.append(b"\1")
            _put_sets(out, change.shared)
        out.append(_U32.pack(len(change.clients)))
        for client, sets in change.clients.items():
            _put_blob(out, client.encode())
            if sets is None:
                out.append(b"\0")
            else:
                out.append(b"\1")
                _put_sets(out, sets.readable)
                _put_sets(out, sets.writable)
        out.append(_U32.pack(len(change.ops)))
        for op in change.ops:
            _put_blob(out, op.client.encode())
            out.append(_U8.pack(OP_KINDS.index(op.kind)))
            _put_sets(out, op.spans)
    return b"".join(out)


class _Reader:
    """A cursor over a payload; every read past its end is JournalError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise JournalError("a change log record ends inside a field")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u32(self) -> int:
        value: int = _U32.unpack(self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = _U64.unpack(self.take(8))[0]
        return value

    def blob(self) -> bytes:
        return self.take(self.u32())

    def text(self) -> str:
        try:
            return self.blob().decode()
        except UnicodeDecodeError:
            raise JournalError("a change log record holds a name that is not UTF-8") from None

    def sets(self) -> Sets:
        return Sets(self.blob(), self.blob())


def decode_changes(payload: bytes) -> list[Change]:
    """The changes of one record's payload; JournalError when it is not what
    `encode_changes` makes."""
    r = _Reader(payload)
    changes = []
    for _ in range(r.u32()):
        space_id = r.text()
        seq = r.u64()
        shared = r.sets() if r.u8() else None
        clients: dict[str, ClientSets | None] = {}
        for _ in range(r.u32()):
            client = r.text()
            clients[client] = ClientSets(r.sets(), r.sets()) if r.u8() else None
        ops = []
        for _ in range(r.u32()):
            client = r.text()
            kind = r.u8()
            if kind >= len(OP_KINDS):
                raise JournalError(f"a change log record holds an unknown operation {kind}")
            ops.append(Op(client, OP_KINDS[kind], r.sets()))
        changes.append(Change(space_id, seq, shared, clients, tuple(ops)))
    if r.pos != len(payload):
        raise JournalError("a change log record has bytes after its changes")
    return changes


def read_log(data: bytes, path: Path) -> tuple[list[Change], int]:
    """The changes of a log file's bytes, and how many bytes they were: less than all when
    the last record is cut short (written when the daemon died). A whole record that is wrong
    (its checksum, its contents) is JournalError, naming the file and where."""
    changes: list[Change] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _RECORD.size:
            break  # the file ends inside a header
        length, length_crc, crc = _RECORD.unpack_from(data, pos)
        if zlib.crc32(data[pos : pos + 4]) != length_crc or length > MAX_RECORD_BYTES:
            raise JournalError(f"{path}: the record at byte {pos} has a damaged length")
        end = pos + _RECORD.size + length
        if end > len(data):
            break  # the file ends inside the payload
        payload = data[pos + _RECORD.size : end]
        if zlib.crc32(payload) != crc:
            raise JournalError(f"{path}: the record at byte {pos} fails its checksum")
        try:
            changes += decode_changes(payload)
        except JournalError as exc:
            raise JournalError(f"{path}: the record at byte {pos}: {exc}") from None
        pos = end
    return changes, pos


class ChangeLog:
    """The restart journal's fast half: each change of an access table (grants, revocations,
    the shared attribute, a fence's drop) is appended to a file as one record, on the event
    loop, before the change is carried out: one write(2) to the page cache, no thread hop.
    What it holds is exactly what a committed `Journal.apply` would hold: a daemon that dies
    leaves whole records (and at most one cut short, which a start drops: its call never
    returned), and the next start folds them into the database before it reads it
    (`Journal.fold_logs`). Durable as the database is (see the module's docstring): in the page
    cache, not fsynced.

    The file is a generation of the log (STATE_DIR/changes.N.log). Once it holds
    `fold_bytes`, the next one is opened and the full one handed back, with its changes, to be
    folded into the database on the journal's thread (`Journal.fold`), which then removes it.
    """

    def __init__(self, directory: Path, gen: int, fold_bytes: int = LOG_FOLD_BYTES) -> None:
        self.directory = directory
        self.fold_bytes = fold_bytes
        self.gen = gen
        self.size = 0
        # The changes in this generation's file, in order: what its fold writes.
        self.changes: list[Change] = []
        # Generations ended early (`_end_torn`) that the caller has yet to have folded
        # (`Writer._fold_ended`).
        self.pending_folds: list[tuple[int, list[Change]]] = []
        self._torn = False
        self._fd = self._open(gen)

    def _open(self, gen: int) -> int:
        return os.open(
            log_path(self.directory, gen),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )

    @property
    def path(self) -> Path:
        return log_path(self.directory, self.gen)

    def append(self, *changes: Change) -> tuple[int, list[Change]] | None:
        """Writes `changes` as one record. Raises OSError when the file does not take it
        whole; then the file is as it was (a part written is cut off again) and the changes are
        not in the log. Returns (generation, its changes) when that generation is full and a
        new one was started: the caller has it folded."""
        payload = encode_changes(changes)
        if self._torn:
            # A part of a record could not be cut off this file: nothing may follow it there.
            self._end_torn()
        length = _U32.pack(len(payload))
        record = length + _U32.pack(zlib.crc32(length)) + _U32.pack(zlib.crc32(payload)) + payload
        written = os.write(self._fd, record)
        if written != len(record):
            # Only a full disk or a file size limit stops a write to a file part way.
            try:
                os.ftruncate(self._fd, self.size)
            except OSError as exc:
                log.error("journal: cannot cut a partial record off %s: %s", self.path, exc)
                self._torn = True
                with contextlib.suppress(OSError):
                    self._end_torn()
            raise OSError(
                errno.ENOSPC,
                f"{self.path} took {written} of a {len(record)}-byte record (disk full?)",
            )
        self.size += written
        self.changes.extend(changes)
        if self.size < self.fold_bytes:
            return None
        try:
            return self.rotate()
        except OSError as exc:
            # This generation goes on; the next append tries again.
            log.error("journal: cannot start change log %d: %s", self.gen + 1, exc)
            return None

    def _end_torn(self) -> None:
        """Leaves a file that ends in part of a record (its cut-off failed) for the next
        generation, whose fold takes this one's changes along: the part stays the file's last
        bytes, which a start reads as a record cut short. Raises OSError while the next file
        cannot be made (then every append fails)."""
        ended = self.rotate()
        self._torn = False
        self.pending_folds.append(ended)

    def rotate(self) -> tuple[int, list[Change]]:
        """Starts the next generation now; returns the one it ends, with its changes, to be
        folded (raises OSError, changing nothing, when the next file cannot be made)."""
        fd = self._open(self.gen + 1)
        os.close(self._fd)
        self._fd = fd
        ended = (self.gen, self.changes)
        self.gen += 1
        self.size = 0
        self.changes = []
        return ended

    def close(self) -> tuple[int, list[Change]]:
        """Closes the file; returns its generation and changes (to be folded)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        return self.gen, self.changes


# -- the database -----------------------------------------------------------------------------


def prepare_state_dir(path: Path) -> None:
    """Creates the directory (0700) if needed; refuses one that another uid owns or that group
    or others may write (they could replace the journal)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise JournalError(f"state directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise JournalError(
            f"state directory {path} is owned by uid {st.st_uid}, not by this daemon's uid "
            f"{os.geteuid()}"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise JournalError(
            f"state directory {path} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o})"
        )


class Journal:
    """The database, used from any thread (one connection, one lock); every write is one
    transaction, committed before the method returns."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_FILE
        prepare_state_dir(directory)
        self._lock_fd = os.open(
            directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise JournalError(
                f"another membrokerd writes the journal in {directory} (it holds {LOCK_FILE}): "
                "give each daemon its own state_dir"
            ) from None
        self._lock = threading.Lock()
        # Log generations whose fold failed: folded again before the next one. None: its changes
        # are those of its file, read back then (`_spill`).
        self._unfolded: list[tuple[int, Sequence[Change] | None]] = []
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=10
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):  # 1: nothing to change but the number
                raise JournalError(
                    f"{self.path} has schema version {version}; this daemon knows {SCHEMA_VERSION}"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self._release_lock()
            raise JournalError(f"cannot open the journal {self.path}: {exc}") from exc
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _write(
        self, body: Callable[[sqlite3.Connection], object], *, survive_reboot: bool = False
    ) -> None:
        """One transaction. `survive_reboot`: fsync the WAL at its commit (the module's
        docstring says why the others need not)."""
        with self._lock:
            db = self._db
            if survive_reboot:
                db.execute("PRAGMA synchronous=FULL")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    body(db)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                if survive_reboot:
                    db.execute("PRAGMA synchronous=NORMAL")

    # -- writes ---------------------------------------------------------------------------------

    def add_space(self, record: SpaceRecord, seq: int = 0) -> None:
        def body(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM spaces WHERE space_id = ?", (record.space_id,))
            db.execute(
                "INSERT INTO spaces VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.space_id,
                    record.name,
                    record.size,
                    record.backing,
                    record.page_size,
                    record.owner,
                    record.owner_uid,
                    int(record.imported),
                    json.dumps([list(r) for r in record.regions]),
                    record.dev,
                    record.ino,
                    record.seals,
                    record.created_unix,
                    seq,
                    b"",
                    b"",
                ),
            )

        self._write(body)

    def apply(self, *changes: Change) -> None:
        """Changes (of one or several spaces) as one transaction. A change of a space the
        journal does not have (deleted meanwhile) is skipped."""
        self._write(lambda db: _apply(db, changes))

    # -- the change log (ChangeLog) folded in ----------------------------------------------------

    def log_generation(self) -> int:
        """The first generation of the change log not yet folded into the database."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'log_gen'").fetchone()
        try:
            return int(row[0]) if row is not None else 0
        except ValueError:
            raise JournalError(f"{self.path}: log_gen {row[0]!r} is not a number") from None

    def defer_fold(self, gen: int, changes: Sequence[Change]) -> None:
        """Generation `gen` is folded with the next fold (call only while no fold runs)."""
        self._unfolded.append((gen, changes))

    def fold(self, gen: int, changes: Sequence[Change]) -> None:
        """The changes of log generation `gen` (all of them, in order) into the database, in
        one transaction that also marks `gen` folded; then its file goes. Generations whose
        fold failed before are folded first, oldest first, each in a transaction of its own
        (a retry is no larger than the fold that failed, and each one that goes in frees its
        file); the first that fails again stops there, and it and every later one wait for the
        next fold: `log_gen` never passes a generation that is not in the database."""
        todo: list[tuple[int, Sequence[Change] | None]] = [*self._unfolded, (gen, changes)]
        for i, (g, part) in enumerate(todo):

            def body(
                db: sqlite3.Connection, g: int = g, part: Sequence[Change] | None = part
            ) -> None:
                _apply(db, self._changes_of(g, part))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('log_gen', ?)", (str(g + 1),))

            try:
                self._write(body)
            except BaseException:
                self._unfolded = self._spill(todo[i:])
                raise
            self._unfolded = todo[i + 1 :]
            # The generation is in the database: a file left behind (below log_gen) is removed
            # by the next start, so a failure here fails nothing.
            path = log_path(self.directory, g)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning(
                    "journal: generation %d is folded, but its file %s could not be removed "
                    "(%s): the next start removes it",
                    g,
                    path,
                    exc,
                )

    def _changes_of(self, gen: int, changes: Sequence[Change] | None) -> Sequence[Change]:
        """A pending generation's changes: as kept, or read back from its file (`_spill`)."""
        if changes is not None:
            return changes
        path = log_path(self.directory, gen)
        return read_log(path.read_bytes(), path)[0]

    def _spill(
        self, todo: list[tuple[int, Sequence[Change] | None]]
    ) -> list[tuple[int, Sequence[Change] | None]]:
        """`todo` with the changes of all but the newest UNFOLDED_IN_MEMORY generations left
        to their files, where a file holds exactly them (whole records, as many changes: not a
        generation a large change ended, whose change is in memory only, nor one that ends in
        part of a record)."""
        kept = 0
        out: list[tuple[int, Sequence[Change] | None]] = []
        for gen, changes in reversed(todo):
            if changes is not None and kept >= UNFOLDED_IN_MEMORY:
                path = log_path(self.directory, gen)
                try:
                    data = path.read_bytes()
                    parsed, used = read_log(data, path)
                except (OSError, JournalError):
                    data, parsed, used = b"", [], -1
                if used == len(data) and len(parsed) == len(changes):
                    changes = None
            if changes is not None:
                kept += 1
            out.append((gen, changes))
        out.reverse()
        return out

    def fold_logs(self) -> int:
        """At open: every change log a previous daemon left (each generation at or after
        `log_gen`, in order) into the database, and their files removed; files of folded
        generations (left by a crash between a fold and its unlink) are removed too. Returns
        the generation the next log starts at. A record cut short (the daemon died while it
        was being written: its change was never reported done) ends its file, with a warning;
        a record that is whole but wrong is JournalError."""
        first = self.log_generation()
        found: list[tuple[int, Path]] = []
        for entry in os.listdir(self.directory):
            gen = _log_generation_of(entry)
            if gen is None:
                continue
            path = self.directory / entry
            if gen < first:
                os.unlink(path)
                continue
            found.append((gen, path))
        if not found:
            return first
        found.sort()
        changes: list[Change] = []
        for _, path in found:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise JournalError(f"cannot read the change log {path}: {exc}") from exc
            parsed, used = read_log(data, path)
            if used < len(data):
                log.warning(
                    "journal: %s ends with %d byte(s) of a record that was being written when "
                    "the daemon stopped (its change was never reported done): dropped",
                    path,
                    len(data) - used,
                )
            changes += parsed
        try:
            self.fold(found[-1][0], changes)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot fold the change logs into {self.path}: {exc}") from exc
        for gen, _ in found[:-1]:  # fold() removed the last one's file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(log_path(self.directory, gen))
        log.info(
            "journal: %d change(s) of %d log file(s) folded into %s",
            len(changes),
            len(found),
            self.path,
        )
        return found[-1][0] + 1

    def delete_space(self, space_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM spaces WHERE space_id = ?", (space_id,)))

    def bind_name(self, client: str, uid: int) -> None:
        self._write(
            lambda db: db.execute(
                "INSERT OR IGNORE INTO names VALUES (?, ?)", (client, uid)
            ).close(),
            survive_reboot=True,
        )

    def add_session(self, record: SessionRecord, replaces: str = "") -> None:
        """A resumable session (`replaces`: the token hash of the session it resumes, whose
        row goes in the same transaction)."""

        def body(db: sqlite3.Connection) -> None:
            if replaces:
                db.execute("DELETE FROM sessions WHERE token_sha256 = ?", (replaces,))
            db.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?,?,?,?,?,?)",
                (
                    record.token_sha256,
                    record.client,
                    record.uid,
                    record.pid,
                    record.start_time,
                    record.created_unix,
                ),
            )

        self._write(body)

    def add_revocations(
        self, reports: Iterable[tuple[str, int, str, str, bool]], keep: int
    ) -> None:
        """Revocation reports (space id, seq, cause, JSON, update), in one transaction; each
        space keeps its `keep` newest (several may share a seq: a resume's or a fence's with
        the change before it). `update`: the report replaces the newest one of that space, seq
        and cause (marked after it was written). A report of a space no longer in the journal
        (deleted meanwhile) is dropped."""

        def body(db: sqlite3.Connection) -> None:
            touched = set()
            for space_id, seq, cause, report, update in reports:
                if not db.execute(
                    "SELECT 1 FROM spaces WHERE space_id = ?", (space_id,)
                ).fetchone():
                    continue
                if update:
                    db.execute(
                        "UPDATE revocations SET report = ? WHERE id = (SELECT max(id) FROM "
                        "revocations WHERE space_id = ? AND seq = ? AND cause = ?)",
                        (report, space_id, seq, cause),
                    )
                    continue
                db.execute(
                    "INSERT INTO revocations (space_id, seq, cause, report) VALUES (?, ?, ?, ?)",
                    (space_id, seq, cause, report),
                )
                touched.add(space_id)
            for space_id in touched:
                db.execute(
                    "DELETE FROM revocations WHERE space_id = ? AND id NOT IN (SELECT id FROM "
                    "revocations WHERE space_id = ? ORDER BY id DESC LIMIT ?)",
                    (space_id, space_id, keep),
                )

        self._write(body)

    def end_sessions(self, *token_sha256: str) -> None:
        """Sessions that can no longer be resumed (ended by their client, fenced, expired)."""
        self._write(
            lambda db: db.executemany(
                "DELETE FROM sessions WHERE token_sha256 = ?", [(t,) for t in token_sha256]
            ).close()
        )

    # -- reading --------------------------------------------------------------------------------

    def load(self) -> Contents:
        """Everything the journal holds (each range set is checked when it is restored)."""
        with self._lock:
            db = self._db
            try:
                spaces = {}
                for row in db.execute("SELECT * FROM spaces ORDER BY created_unix"):
                    record = SpaceRecord(
                        space_id=row[0],
                        name=row[1],
                        size=row[2],
                        backing=row[3],
                        page_size=row[4],
                        owner=row[5],
                        owner_uid=row[6],
                        imported=bool(row[7]),
                        regions=tuple(tuple(r) for r in json.loads(row[8])),
                        dev=row[9],
                        ino=row[10],
                        seals=row[11],
                        created_unix=row[12],
                    )
                    spaces[record.space_id] = SpaceState(
                        record, row[13], Sets(row[14], row[15]), {}
                    )
                for row in db.execute("SELECT * FROM grants"):
                    state = spaces.get(row[0])
                    if state is not None:
                        state.grants[row[1]] = ClientSets(
                            Sets(row[2], row[3]), Sets(row[4], row[5])
                        )
                for row in db.execute(
                    "SELECT space_id, client, kind, starts, ends FROM ops ORDER BY id"
                ):
                    state = spaces.get(row[0])
                    if row[2] not in OP_KINDS:
                        raise JournalError(f"unknown operation {row[2]!r}")
                    if state is not None:
                        state.ops.append(Op(row[1], row[2], Sets(row[3], row[4])))
                names = {c: u for c, u in db.execute("SELECT client, uid FROM names")}
                sessions = [
                    SessionRecord(*row)
                    for row in db.execute(
                        "SELECT token_sha256, client, uid, pid, start_time, created_unix "
                        "FROM sessions"
                    )
                ]
                revocations: dict[str, list[str]] = {}
                for space_id, report in db.execute(
                    "SELECT space_id, report FROM revocations ORDER BY space_id, id"
                ):
                    revocations.setdefault(space_id, []).append(report)
            except (sqlite3.Error, ValueError, TypeError) as exc:
                raise JournalError(f"cannot read the journal {self.path}: {exc}") from exc
        return Contents(list(spaces.values()), names, sessions, revocations)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._release_lock()


class Writer:
    """The journal's writes. Changes of the access tables go to the change log on the event
    loop (`log`: one append each, in the order the loop made them); everything else (spaces,
    sessions, names, reports, and the folds of full log generations) to the database on one
    worker thread, in the order submitted, so the journal always moves forward. `write` waits
    for its commit; `submit` does not. `compaction` (used on the loop) decides what a change
    writes. Opening a Writer folds the change logs a previous daemon left; closing one folds
    its own."""

    def __init__(
        self,
        journal: Journal,
        compaction: Compaction | None = None,
        fold_bytes: int = LOG_FOLD_BYTES,
    ) -> None:
        self.journal = journal
        self.compaction = compaction or Compaction()
        try:
            gen = journal.fold_logs()
            self.changes = ChangeLog(journal.directory, gen, fold_bytes)
        except OSError as exc:
            journal.close()
            raise JournalError(f"cannot open the change log in {journal.directory}: {exc}") from exc
        except BaseException:
            journal.close()
            raise
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="journal")
        # Failed writes so far, by WRITE_KINDS (membroker_journal_errors_total); counted from
        # the loop and the journal's thread.
        self.errors = dict.fromkeys(WRITE_KINDS, 0)
        self._errors_lock = threading.Lock()

    def _failed(self, kind: str) -> None:
        with self._errors_lock:
            self.errors[kind] += 1

    def error_counts(self) -> dict[str, int]:
        """A copy of `errors`, taken under their lock."""
        with self._errors_lock:
            return dict(self.errors)

    def log(self, *changes: Change) -> None:
        """Appends `changes` to the change log (on the loop): they are in the journal when this
        returns. Raises OSError when they are not (the log is as it was)."""
        try:
            full = self.changes.append(*changes)
        except OSError:
            self._failed("append")
            raise
        finally:
            self._fold_ended()
        if full is not None:
            self._fold(*full)

    def _fold_ended(self) -> None:
        """Has the generations the log ended early (see `ChangeLog._end_torn`) folded."""
        while self.changes.pending_folds:
            self._fold(*self.changes.pending_folds.pop(0))

    def _fold(self, gen: int, changes: list[Change]) -> concurrent.futures.Future[None]:
        try:
            return self.submit(self.journal.fold, gen, changes, kind="fold")
        except RuntimeError:
            # The thread is gone (the journal is closing): the close folds it, with its own.
            self.journal.defer_fold(gen, changes)
            failed: concurrent.futures.Future[None] = concurrent.futures.Future()
            failed.set_exception(JournalError("the journal is closing"))
            return failed

    def log_large(self, *changes: Change) -> concurrent.futures.Future[None]:
        """A change too large to append on the loop (`LARGE_CHANGE_BYTES`): the log's current
        generation ends here, and it is folded into the database with this change as its last,
        on the journal's thread, in one transaction; the future says when (the call that made
        the change waits for it). In order with every other change: those before it are in
        the generation it ends, those after it go to the next one, which is folded after it
        (and a start that finds the ended generation unfolded replays it without this change,
        whose call never returned). Raises OSError when the next generation cannot start."""
        self._fold_ended()
        try:
            gen, before = self.changes.rotate()
        except OSError:
            self._failed("append")
            raise
        return self._fold(gen, [*before, *changes])

    def submit(
        self, fn: Callable[..., T], *args: object, kind: str = "write"
    ) -> concurrent.futures.Future[T]:
        """Runs `fn(*args)` on the journal's thread, after what was submitted before; a
        failure is logged and counted as a failed write of `kind` (WRITE_KINDS)."""
        future = self._pool.submit(fn, *args)
        future.add_done_callback(functools.partial(self._done, kind))
        return future

    def _done(self, kind: str, future: concurrent.futures.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._failed(kind)
            log.error("journal write failed: %s", future.exception())

    async def write(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        gen, changes = self.changes.close()
        try:
            self.journal.fold(gen, changes)
        except (sqlite3.Error, OSError) as exc:
            # Its file stays: the next start folds it.
            self._failed("fold")
            log.error("journal: folding change log %d at close failed: %s", gen, exc)
        self.journal.close()

    @property
    def unfolded(self) -> int:
        """Generations of the change log whose fold failed, waiting for the next one."""
        return len(self.journal._unfolded)

    @property
    def unfolded_in_memory(self) -> int:
        """Of those, the ones whose changes are held in memory (at most UNFOLDED_IN_MEMORY,
        but for generations no file holds exactly)."""
        return sum(1 for _, changes in self.journal._unfolded if changes is not None)


__all__ = [
    "LARGE_CHANGE_BYTES",
    "UNFOLDED_IN_MEMORY",
    "WRITE_KINDS",
    "Change",
    "ChangeLog",
    "ClientSets",
    "Compaction",
    "Contents",
    "Journal",
    "JournalError",
    "Op",
    "SessionRecord",
    "Sets",
    "SpaceRecord",
    "SpaceState",
    "Writer",
    "capture",
    "change_bytes",
    "client_sets",
    "restore_table",
]
