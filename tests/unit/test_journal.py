"""membrokerd.journal: the access table and space records on disk (sqlite, WAL, fsync per
commit), read back into an equal table; a million-fragment client stored as blobs; a writer
killed mid-stream leaves a journal that reopens consistent."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from membroker.rangeset import RangeSet
from membrokerd.access import Access, AccessTable
from membrokerd.journal import (
    EMPTY,
    GRANT_RO,
    GRANT_RW,
    JOURNAL_FILE,
    LARGE_CHANGE_BYTES,
    PRIVATE,
    REVOKE,
    SHARE,
    SHARED,
    UNFOLDED_IN_MEMORY,
    Change,
    ClientSets,
    Compaction,
    Journal,
    JournalError,
    Sets,
    SpaceRecord,
    SpaceState,
    Writer,
    capture,
    change_bytes,
    read_log,
    restore_table,
)

PAGE = 4096
ROOT = Path(__file__).resolve().parents[2]


def record(space_id: str = "sp-0000abcd", size: int = 64 * PAGE) -> SpaceRecord:
    return SpaceRecord(
        space_id=space_id,
        name="guest",
        size=size,
        backing="memfd",
        page_size=PAGE,
        owner="vmm",
        owner_uid=1000,
        imported=False,
        regions=((1 << 32, 0, size),),
        dev=5,
        ino=12345,
        seals=15,
        created_unix=1700000000.5,
    )


def same_table(a: AccessTable, b: AccessTable) -> None:
    assert a.seq == b.seq
    assert a.shared == b.shared
    assert a.clients() == b.clients()
    assert a.grants() == b.grants()
    for client in a.clients():
        assert a.effective(client) == b.effective(client)


def test_round_trip(tmp_path: Path) -> None:
    table = AccessTable(64 * PAGE)
    j = Journal(tmp_path / "state")
    j.add_space(record())
    j.bind_name("backend", 1001)
    steps = [
        (lambda: table.set_shared_many([(0, 32 * PAGE), (40 * PAGE, 8 * PAGE)]), (), True),
        (lambda: table.grant_many("backend", [(0, 8 * PAGE)], Access.RW), ("backend",), False),
        (lambda: table.grant("backend", 16 * PAGE, 4 * PAGE, Access.RO), ("backend",), False),
        (lambda: table.grant("other", 40 * PAGE, 2 * PAGE, Access.RW), ("other",), False),
        (lambda: table.revoke("backend", 2 * PAGE, PAGE), ("backend",), False),
        (lambda: table.set_private(16 * PAGE, 2 * PAGE), (), True),
        (lambda: table.grant("gone", 0, PAGE, Access.RO), ("gone",), False),
        (lambda: table.revoke("gone", 0, PAGE), ("gone",), False),
    ]
    for step, clients, shared in steps:
        step()
        j.apply(capture("sp-0000abcd", table, clients, shared))
    j.close()

    again = Journal(tmp_path / "state")
    contents = again.load()
    assert contents.names == {"backend": 1001}
    [state] = contents.spaces
    assert state.record == record()
    assert state.seq == table.seq == len(steps)
    assert sorted(state.grants) == ["backend", "other"]  # "gone" holds nothing: no row
    restored = AccessTable(64 * PAGE)
    restore_table(restored, state)
    same_table(table, restored)
    # The restored table goes on like the original.
    assert restored.revoke("other", 40 * PAGE, PAGE).seq == table.seq + 1

    again.delete_space("sp-0000abcd")
    assert again.load().spaces == []
    db = sqlite3.connect(tmp_path / "state" / JOURNAL_FILE)
    assert db.execute("SELECT count(*) FROM grants").fetchone() == (0,)  # cascaded
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    again.close()


def test_change_of_a_deleted_space_is_skipped(tmp_path: Path) -> None:
    table = AccessTable(8 * PAGE)
    table.set_shared(0, 8 * PAGE)
    table.grant("c", 0, PAGE, Access.RO)
    j = Journal(tmp_path / "s")
    j.apply(capture("sp-00000001", table, ("c",), True))  # no such space: nothing written
    assert j.load().spaces == []
    j.close()


def test_a_million_fragment_client_is_one_row_of_blobs(tmp_path: Path) -> None:
    n = 1_000_000
    size = 2 * n * PAGE
    table = AccessTable(size)
    table.set_shared(0, size)
    table.grant_many("frag", [(i * 2 * PAGE, PAGE) for i in range(n)], Access.RO)
    table.grant_many("frag", [(i * 4 * PAGE, PAGE) for i in range(n // 2)], Access.RW)
    table.grant("small", 0, 4 * PAGE, Access.RW)
    assert table.fragment_count("frag") == n + n // 2
    j = Journal(tmp_path / "s")
    j.add_space(record(size=size))

    t0 = time.perf_counter()
    change = capture("sp-0000abcd", table, ("frag", "small"), shared=True)
    captured = time.perf_counter() - t0
    t0 = time.perf_counter()
    j.apply(change)
    written = time.perf_counter() - t0
    # A change to the small client rewrites its row only.
    table.revoke("small", 0, PAGE)
    t0 = time.perf_counter()
    j.apply(capture("sp-0000abcd", table, ("small",)))
    small = time.perf_counter() - t0
    # A change to the large one, as the broker writes it: the operation, not the 24 MB.
    comp = Compaction()
    table.grant("frag", PAGE, PAGE, Access.RO)
    t0 = time.perf_counter()
    change = comp.change("sp-0000abcd", table, "frag", GRANT_RO, [(PAGE, PAGE)])
    assert change.clients == {} and len(change.ops) == 1 and len(change.ops[0].spans) == 1
    j.apply(change)
    logged = time.perf_counter() - t0
    j.close()

    db = sqlite3.connect(tmp_path / "s" / JOURNAL_FILE)
    rows = db.execute(
        "SELECT client, length(readable_starts), length(writable_starts) FROM grants "
        "ORDER BY client"
    ).fetchall()
    db.close()
    assert rows == [("frag", 8 * n, 8 * (n // 2)), ("small", 8, 8)]
    table.revoke("frag", PAGE, PAGE)  # the logged grant is replayed: undo it to compare

    t0 = time.perf_counter()
    again = Journal(tmp_path / "s")
    [state] = again.load().spaces
    restored = AccessTable(size)
    restore_table(restored, state)
    loaded = time.perf_counter() - t0
    again.close()
    assert restored.seq == table.seq - 1
    # The fragment between pages 0 and 2 is granted (from the log): 2 fragments merged.
    assert restored.effective_access("frag", PAGE, PAGE) is Access.RO
    restored.revoke("frag", PAGE, PAGE)
    assert restored.fragment_count("frag") == n + n // 2
    assert restored.effective_access("frag", 4 * PAGE, PAGE) is Access.RW
    assert restored.effective_access("frag", 2 * PAGE, PAGE) is Access.RO
    assert restored.effective_access("frag", PAGE, PAGE) is Access.NONE
    assert restored.grants("small") == table.grants("small")
    print(
        f"1.5 M fragments: capture {captured * 1000:.1f} ms (on the loop), snapshot write "
        f"{written * 1000:.0f} ms, a logged one-range change {logged * 1000:.1f} ms, a small "
        f"client's change {small * 1000:.1f} ms, load + restore {loaded * 1000:.0f} ms"
    )
    assert captured < 0.5 and written < 5 and loaded < 10 and logged < 0.5


def test_bad_sets_are_refused() -> None:
    good = Sets.of(RangeSet([(1, 3), (5, 9)]))
    assert list(good.rangeset(10)) == [(1, 3), (5, 9)]
    with pytest.raises(JournalError, match="past"):
        good.rangeset(8)
    with pytest.raises(JournalError, match="different lengths"):
        Sets(good.starts, good.ends[:8]).rangeset(10)
    with pytest.raises(JournalError, match="sorted"):
        Sets(good.ends, good.starts).rangeset(10)


def test_one_writer_per_state_dir(tmp_path: Path) -> None:
    j = Journal(tmp_path / "s")
    with pytest.raises(JournalError, match="another membrokerd"):
        Journal(tmp_path / "s")
    j.close()
    Journal(tmp_path / "s").close()


def test_state_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o777)
    with pytest.raises(JournalError, match="writable by group or others"):
        Journal(d)


_WRITER = r"""
import sys
sys.path[:0] = [sys.argv[2] + "/clients", sys.argv[2] + "/broker"]
from pathlib import Path
from membrokerd.access import Access, AccessTable
from membrokerd.journal import Journal, SpaceRecord, capture

PAGE = 4096
pages = 1 << 16
table = AccessTable(pages * PAGE)
j = Journal(Path(sys.argv[1]))
j.add_space(SpaceRecord("sp-0000abcd", "g", pages * PAGE, "memfd", PAGE, "vmm", 0, False, (),
                        1, 2, 15, 0.0))
table.set_shared(0, pages * PAGE)
j.apply(capture("sp-0000abcd", table, (), True))
i = 0
while True:  # until killed: one committed grant after another, each reported once committed
    client = f"c{i % 7}"
    table.grant(client, (i * 2 % pages) * PAGE, PAGE, Access.RW if i % 3 else Access.RO)
    j.apply(capture("sp-0000abcd", table, (client,)))
    print(table.seq, flush=True)
    i += 1
"""


def _seqs_until_killed(args: list[str], count: int) -> list[int]:
    """Runs a writer script until it has reported `count` seqs, kills it (SIGKILL) and returns
    every seq it reported: each complete line is a change it had written."""
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seqs = []
    try:
        while len(seqs) < count:
            line = proc.stdout.readline()
            assert line, "the writer died"
            seqs.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # What it reported before it died but this test had not read yet (on a loaded machine
        # the writer runs ahead of the reader).
        rest = proc.stdout.read()
        proc.stdout.close()
    return seqs + [int(line) for line in rest.split("\n")[:-1]]


def _check_the_writers_history(state: SpaceState, last_reported: int) -> None:
    """Every change the writer reported is there, and at most the one it was writing when it
    died; the same history (the writers' grants) replayed up to that seq gives the same table."""
    assert last_reported <= state.seq <= last_reported + 1, (last_reported, state.seq)
    table = AccessTable(state.record.size)
    restore_table(table, state)  # checks every set
    assert table.seq == state.seq
    replay = AccessTable(state.record.size)
    pages = state.record.size // PAGE
    replay.set_shared(0, pages * PAGE)
    i = 0
    while replay.seq < state.seq:
        replay.grant(f"c{i % 7}", (i * 2 % pages) * PAGE, PAGE, Access.RW if i % 3 else Access.RO)
        i += 1
    same_table(replay, table)


def test_a_killed_writer_leaves_a_consistent_journal(tmp_path: Path) -> None:
    state_dir = tmp_path / "s"
    seqs = _seqs_until_killed([_WRITER, str(state_dir), str(ROOT)], 300)
    wal = state_dir / (JOURNAL_FILE + "-wal")
    assert wal.exists() and wal.stat().st_size > 0  # never checkpointed by a clean close
    # A torn last write: garbage where the next frame would have gone.
    with open(wal, "ab") as f:
        f.write(os.urandom(5000))

    j = Journal(state_dir)
    [state] = j.load().spaces
    j.close()
    _check_the_writers_history(state, seqs[-1])


@pytest.mark.parametrize("small, max_ops", [(0, 1), (2, 3), (4, 50), (10**9, 1)])
def test_logged_operations_replay_to_the_same_table(
    tmp_path: Path, small: int, max_ops: int
) -> None:
    """Random changes as the broker journals them (snapshots of small sets, operations on
    large ones, compaction every max_ops): the journal reloads to the very same table at every
    point, including fenced clients and whole revokes."""
    import random

    rng = random.Random(small * 31 + max_ops)
    pages = 256
    table = AccessTable(pages * PAGE)
    j = Journal(tmp_path / "s")
    j.add_space(record(size=pages * PAGE))
    comp = Compaction(small=small, max_ops=max_ops)
    clients = ["a", "b", "c"]

    def spans() -> list[tuple[int, int]]:
        cuts = sorted(rng.sample(range(pages + 1), 2 * rng.randint(1, 6)))
        out = []
        for i in range(0, len(cuts), 2):
            if cuts[i] < cuts[i + 1]:
                out.append((cuts[i] * PAGE, (cuts[i + 1] - cuts[i]) * PAGE))
        return out or [(0, PAGE)]

    for step in range(300):
        roll = rng.random()
        batch = spans()
        if roll < 0.2:
            table.set_shared_many(batch)
            change = comp.change("sp-0000abcd", table, SHARED, SHARE, batch)
        elif roll < 0.3:
            table.set_private_many(batch)
            change = comp.change("sp-0000abcd", table, SHARED, PRIVATE, batch)
        elif roll < 0.7:
            client = rng.choice(clients)
            shared = [(o, n) for o, n in batch if table.is_shared(o, n)]
            if not shared:
                continue
            rw = rng.random() < 0.5
            table.grant_many(client, shared, Access.RW if rw else Access.RO)
            change = comp.change("sp-0000abcd", table, client, GRANT_RW if rw else GRANT_RO, shared)
        elif roll < 0.97:
            client = rng.choice(clients)
            table.revoke_many(client, batch)
            change = comp.change("sp-0000abcd", table, client, REVOKE, batch)
        else:
            client = rng.choice(clients)
            table.forget_client(client)
            change = comp.forget("sp-0000abcd", table, client)
        j.apply(change)
        if step % 25 == 24:
            [state] = j.load().spaces
            again = AccessTable(pages * PAGE)
            restore_table(again, state)
            same_table(table, again)
    j.close()


_SYNCS = r"""
import os, sys
sys.path[:0] = [sys.argv[2] + "/clients", sys.argv[2] + "/broker"]
from pathlib import Path
from membrokerd.access import Access, AccessTable
from membrokerd.journal import Journal, SpaceRecord, capture

PAGE = 4096
table = AccessTable(64 * PAGE)
j = Journal(Path(sys.argv[1]))
os.getppid()  # marker: the journal is open
j.add_space(SpaceRecord("sp-0000abcd", "g", 64 * PAGE, "memfd", PAGE, "vmm", 0, False, (),
                        1, 2, 15, 0.0))
table.set_shared(0, 64 * PAGE)
j.apply(capture("sp-0000abcd", table, (), True))
for i in range(20):
    table.grant("c", i * PAGE, PAGE, Access.RW)
    j.apply(capture("sp-0000abcd", table, ("c",)))
os.getppid()  # marker: space and grant changes are committed
j.bind_name("c", 0)
os.getppid()  # marker: the name binding is committed (closing the journal syncs it all)
"""


def test_only_name_bindings_are_fsynced(tmp_path: Path) -> None:
    """Space and grant changes are committed without an fsync (they describe memory that a
    power loss takes with it; a killed daemon finds them, see the test above); a name
    binding, which outlives that memory, is fsynced at its commit. Counted from the real
    syscalls (strace), between markers."""
    trace = tmp_path / "trace"
    subprocess.run(
        [
            *("strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,getppid", "-o", str(trace)),
            *(sys.executable, "-c", _SYNCS, str(tmp_path / "s"), str(ROOT)),
        ],
        check=True,
    )
    calls = [
        name
        for line in trace.read_text().splitlines()
        for name in ("fsync", "fdatasync", "getppid")
        if f" {name}(" in line or line.startswith(f"{name}(")
    ]
    phases = " ".join(calls).split("getppid")
    assert len(phases) == 4, calls  # before the first marker, between them, after the last
    assert phases[1].split() == [], f"a space or grant change was fsynced: {calls}"
    assert phases[2].split() != [], f"the name binding was not fsynced: {calls}"


def test_revocation_reports_keep_the_newest_and_go_with_their_space(tmp_path: Path) -> None:
    from membrokerd.broker import (
        ClientResult,
        Outcome,
        RevocationResult,
        report_from_json,
        report_to_json,
    )
    from membrokerd.enforcement import FenceResult

    j = Journal(tmp_path / "s")
    j.add_space(record("sp-0000abcd"))
    j.add_space(record("sp-0000beef"))
    fenced = ClientResult(
        "c", "se-1", 42, Outcome.FENCED, 0.25, "no ack", FenceResult.KILLED, ((0, 4096),)
    )
    reports = [
        RevocationResult("sp-0000abcd", seq, (fenced,), 0.5, 4096 * seq, "revoke")
        for seq in range(1, 6)
    ]
    j.add_revocations([(r.space_id, r.seq, r.cause, report_to_json(r), False) for r in reports], 3)
    # Same seq, another cause: both kept; a later mark updates the newest of that seq and cause.
    resync = RevocationResult("sp-0000abcd", 5, (), 0.1, 0, "resume")
    reports[-1].caller_gone = True
    j.add_revocations(
        [
            ("sp-0000abcd", 5, "resume", report_to_json(resync), False),
            ("sp-0000abcd", 5, "revoke", report_to_json(reports[-1]), True),
            ("sp-0000beef", 1, "delete", report_to_json(resync), False),
            ("sp-00000000", 1, "revoke", report_to_json(resync), False),  # no such space
        ],
        keep=3,
    )
    loaded = {k: [report_from_json(t) for t in v] for k, v in j.load().revocations.items()}
    assert loaded["sp-0000abcd"] == [reports[3], reports[4], resync]
    assert loaded["sp-0000abcd"][1].caller_gone
    assert loaded["sp-0000abcd"][0].clients[0] == fenced
    assert set(loaded) == {"sp-0000abcd", "sp-0000beef"}
    j.delete_space("sp-0000abcd")
    assert set(j.load().revocations) == {"sp-0000beef"}
    with pytest.raises((ValueError, KeyError)):
        report_from_json('{"seq": 1}')
    j.close()


# -- the change log ----------------------------------------------------------------------------

_LOG_WRITER = r"""
import sys
sys.path[:0] = [sys.argv[2] + "/clients", sys.argv[2] + "/broker"]
from pathlib import Path
from membrokerd.access import Access, AccessTable
from membrokerd.journal import Journal, SpaceRecord, Writer, capture

PAGE = 4096
pages = 1 << 16
table = AccessTable(pages * PAGE)
w = Writer(Journal(Path(sys.argv[1])), fold_bytes=int(sys.argv[3]))
w.journal.add_space(SpaceRecord("sp-0000abcd", "g", pages * PAGE, "memfd", PAGE, "vmm", 0, False,
                                (), 1, 2, 15, 0.0))
table.set_shared(0, pages * PAGE)
w.log(capture("sp-0000abcd", table, (), True))
i = 0
while True:  # until killed: one logged grant after another, each reported once logged
    client = f"c{i % 7}"
    table.grant(client, (i * 2 % pages) * PAGE, PAGE, Access.RW if i % 3 else Access.RO)
    w.log(capture("sp-0000abcd", table, (client,)))
    print(table.seq, flush=True)
    i += 1
"""


def _log_files(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("changes.*.log"), key=lambda p: int(p.name.split(".")[1]))


def test_a_killed_writer_of_the_change_log_leaves_every_logged_change(tmp_path: Path) -> None:
    """The broker's hot path: changes appended to the change log, full generations folded into
    the database on the journal's thread meanwhile. Killed at any point, with the record it
    was writing cut short: the next open folds what is left and loads exactly the changes it
    reported (and at most the one it was writing)."""
    state_dir = tmp_path / "s"
    seqs = _seqs_until_killed([_LOG_WRITER, str(state_dir), str(ROOT), "4096"], 600)
    logs = _log_files(state_dir)
    assert logs, "no change log"
    # Generations were folded while it ran (each ~4 KiB: 600 changes are many generations).
    assert int(logs[0].name.split(".")[1]) > 0
    # The record being written when it died, cut short: a header promising more than is there.
    with open(logs[-1], "ab") as f:
        length = struct.pack("<I", 100)
        f.write(length + struct.pack("<II", zlib.crc32(length), 0) + b"\1\2")

    w = Writer(Journal(state_dir))
    try:
        [state] = w.journal.load().spaces
        # Folded and gone; the new daemon's own generation comes after them, empty.
        [own] = _log_files(state_dir)
        assert int(own.name.split(".")[1]) == int(logs[-1].name.split(".")[1]) + 1
        assert own.stat().st_size == 0
    finally:
        w.close()
    _check_the_writers_history(state, seqs[-1])
    assert not _log_files(state_dir)  # the close folded its own generation


def _logged_space(state_dir: Path, fold_bytes: int = 1 << 20) -> tuple[Writer, AccessTable]:
    w = Writer(Journal(state_dir), fold_bytes=fold_bytes)
    w.journal.add_space(record(size=64 * PAGE))
    table = AccessTable(64 * PAGE)
    table.set_shared(0, 64 * PAGE)
    w.log(capture("sp-0000abcd", table, (), True))
    return w, table


@pytest.mark.parametrize(
    "where, error",
    [
        (20, "fails its checksum"),  # a payload byte
        (2, "has a damaged length"),  # bit 16 of the length: it would reach past the end
    ],
)
def test_a_damaged_record_in_the_change_log_refuses_the_journal(
    tmp_path: Path, where: int, error: str
) -> None:
    """A whole record that is damaged, in its payload or in its length, is not a torn write
    (a damaged length must not pass for a record cut short, which would drop the revocation
    after it): the journal is not opened (JournalError names the file and where), and nothing
    is folded or removed. A foreign file that only looks like a log is left alone."""
    state_dir = tmp_path / "s"
    w, table = _logged_space(state_dir)
    table.grant("c", 0, PAGE, Access.RW)
    w.log(capture("sp-0000abcd", table, ("c",)))
    table.revoke("c", 0, PAGE)
    w.log(capture("sp-0000abcd", table, ("c",)))
    table.grant("d", PAGE, PAGE, Access.RW)
    w.log(capture("sp-0000abcd", table, ("d",)))
    path = w.changes.path
    w._pool.shutdown()
    w.changes.close()
    w.journal.close()  # as a crash would: nothing folded
    foreign = state_dir / "changes.07.log"
    foreign.write_bytes(b"not ours")
    data = bytearray(path.read_bytes())
    # The records: the share's, the grant's, then the revoke's (the one damaged).
    ends = [0]
    while len(ends) < 3:
        ends.append(ends[-1] + 12 + struct.unpack_from("<I", data, ends[-1])[0])
    data[ends[2] + where] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError, match=rf"{path.name}: the record at byte {ends[2]} {error}"):
        Writer(Journal(state_dir))
    assert path.read_bytes() == bytes(data)
    # The lock went with the refused open: a fixed log opens, with the revocation in force.
    data[ends[2] + where] ^= 0x01
    path.write_bytes(bytes(data))
    w = Writer(Journal(state_dir))
    try:
        [state] = w.journal.load().spaces
        assert state.seq == table.seq and set(state.grants) == {"d"}
    finally:
        w.close()
    assert foreign.read_bytes() == b"not ours"


def test_a_journal_of_schema_1_opens_and_one_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """Schema 2 brought the change log: a journal of 1 (before it) opens and becomes 2; one
    of a later schema is refused rather than read wrong (as a daemon knowing only 1 refuses
    2, instead of ignoring the log it cannot read)."""
    state_dir = tmp_path / "s"
    Journal(state_dir).close()
    for version, opens in ((1, True), (3, False)):
        db = sqlite3.connect(state_dir / JOURNAL_FILE)
        db.execute(f"PRAGMA user_version={version}")
        db.close()
        if opens:
            j = Journal(state_dir)
            j.close()
            db = sqlite3.connect(state_dir / JOURNAL_FILE)
            assert db.execute("PRAGMA user_version").fetchone()[0] == 2
            db.close()
        else:
            with pytest.raises(JournalError, match="has schema version 3; this daemon knows 2"):
                Journal(state_dir)


def _journal_holds(w: Writer, table: AccessTable) -> None:
    """The journal's database, read back, gives `table` (its one space)."""
    [state] = w.journal.load().spaces
    restored = AccessTable(64 * PAGE)
    restore_table(restored, state)
    same_table(table, restored)


@contextlib.contextmanager
def _folds_refused(state_dir: Path) -> Iterator[None]:
    """The journal's database refuses every write (its WAL made immutable) until the end."""
    chattr = shutil.which("chattr") or pytest.skip("no chattr")
    wal = state_dir / (JOURNAL_FILE + "-wal")
    if subprocess.run([chattr, "+i", str(wal)], capture_output=True).returncode:
        pytest.skip("chattr +i does not work on this file system")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(wal)], check=True)


def test_a_failed_fold_is_folded_again_with_the_next_generation(tmp_path: Path) -> None:
    """The database refuses a fold (its WAL made immutable): that generation's file stays and
    log_gen does not pass it; the next fold writes both, then removes both files."""
    state_dir = tmp_path / "s"
    w, table = _logged_space(state_dir, fold_bytes=1)  # every append fills its generation
    try:
        w.submit(lambda: None).result()  # the share's fold is done
        assert w.journal.log_generation() == 1
        with _folds_refused(state_dir):
            table.grant("c", 0, PAGE, Access.RW)
            w.log(capture("sp-0000abcd", table, ("c",)))
            w.submit(lambda: None).result()  # the thread is past the fold that failed
            assert [gen for gen, _ in w.journal._unfolded] == [1]
            assert w.unfolded == 1 and w.errors == {"append": 0, "fold": 1, "write": 0}
        assert w.journal.log_generation() == 1
        assert [p.name for p in _log_files(state_dir)] == ["changes.1.log", "changes.2.log"]
        table.grant("c", PAGE, PAGE, Access.RO)
        w.log(capture("sp-0000abcd", table, ("c",)))
        w.submit(lambda: None).result()
        assert w.journal.log_generation() == 3
        assert [p.name for p in _log_files(state_dir)] == ["changes.3.log"]
        assert w.unfolded == 0 and w.errors["fold"] == 1
        _journal_holds(w, table)
    finally:
        w.close()


def _three_generations_waiting(state_dir: Path) -> tuple[Writer, AccessTable]:
    """A logged space whose generations 1-3 (a grant each, to clients a, b and c) wait: their
    folds were refused (the WAL immutable meanwhile), so log_gen is still 1."""
    w, table = _logged_space(state_dir, fold_bytes=1)  # every append fills its generation
    try:
        w.submit(lambda: None).result()  # the share's fold is done
        assert w.journal.log_generation() == 1
        with _folds_refused(state_dir):
            for i, client in enumerate(("a", "b", "c")):
                table.grant(client, i * PAGE, PAGE, Access.RW)
                w.log(capture("sp-0000abcd", table, (client,)))
            w.submit(lambda: None).result()
            assert w.unfolded == 3 and w.errors["fold"] == 3
            assert w.journal.log_generation() == 1
    except BaseException:
        w.close()
        raise
    return w, table


def test_waiting_generations_are_folded_one_at_a_time(tmp_path: Path) -> None:
    """Three generations wait (the WAL was immutable). When the database takes writes again
    but refuses the second generation's change (a trigger on the grants table), the retry
    folds the first one, in its own transaction: log_gen moves past it and its file goes,
    while the refused one and every later one wait. Once the trigger is gone, the next fold
    writes them all."""
    state_dir = tmp_path / "s"
    w, table = _three_generations_waiting(state_dir)
    try:
        other = sqlite3.connect(state_dir / JOURNAL_FILE)
        try:
            other.execute(
                "CREATE TRIGGER refuse_b BEFORE INSERT ON grants WHEN NEW.client = 'b' "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
            )
            other.commit()
            table.grant("d", 3 * PAGE, PAGE, Access.RO)
            w.log(capture("sp-0000abcd", table, ("d",)))
            w.submit(lambda: None).result()
            assert w.errors["fold"] == 4
            assert w.journal.log_generation() == 2  # generation 1 (client a) is in
            assert [gen for gen, _ in w.journal._unfolded] == [2, 3, 4]
            assert w.unfolded == 3
            assert [p.name for p in _log_files(state_dir)] == [
                "changes.2.log",
                "changes.3.log",
                "changes.4.log",
                "changes.5.log",
            ]
            held = {row[0] for row in other.execute("SELECT client FROM grants")}
            assert held == {"a"}
            other.execute("DROP TRIGGER refuse_b")
            other.commit()
        finally:
            other.close()
        table.grant("e", 4 * PAGE, PAGE, Access.RO)
        w.log(capture("sp-0000abcd", table, ("e",)))
        w.submit(lambda: None).result()
        assert w.unfolded == 0 and w.errors["fold"] == 4
        assert w.journal.log_generation() == 6
        assert [p.name for p in _log_files(state_dir)] == ["changes.6.log"]
        _journal_holds(w, table)
    finally:
        w.close()


def test_a_folded_generation_whose_file_cannot_be_removed_stays_folded(tmp_path: Path) -> None:
    """Three generations wait (the WAL was immutable); then the state directory is made
    append-only (`chattr +a`: files can be made there, none removed). The retry folds every
    generation, and each file's removal fails (EPERM) after its commit: that fails nothing
    (no fold error, nothing left waiting, log_gen past them all), and no generation is lost or
    folded twice. The files stay until the next start, which removes them."""
    chattr = shutil.which("chattr") or pytest.skip("no chattr")
    state_dir = tmp_path / "s"
    w, table = _three_generations_waiting(state_dir)
    try:
        if subprocess.run([chattr, "+a", str(state_dir)], capture_output=True).returncode:
            pytest.skip("chattr +a does not work on this file system")
        try:
            table.grant("d", 3 * PAGE, PAGE, Access.RO)
            w.log(capture("sp-0000abcd", table, ("d",)))
            w.submit(lambda: None).result()
            assert w.unfolded == 0 and w.errors["fold"] == 3
            assert w.journal.log_generation() == 5
            assert [p.name for p in _log_files(state_dir)] == [
                f"changes.{gen}.log" for gen in range(1, 6)
            ]
            _journal_holds(w, table)
        finally:
            subprocess.run([chattr, "-a", str(state_dir)], check=True)
    finally:
        w.close()
    w = Writer(Journal(state_dir))
    try:
        # Generations 1-4 folded: removed at the start; 6 is the new daemon's own log.
        assert [p.name for p in _log_files(state_dir)] == ["changes.6.log"]
        _journal_holds(w, table)
    finally:
        w.close()


def test_folds_refused_for_long_keep_a_few_generations_in_memory(tmp_path: Path) -> None:
    """The database refuses folds (its WAL immutable) while the log keeps taking changes: 31
    generations wait, each the only record of its own client. Only the newest
    UNFOLDED_IN_MEMORY keep their changes in memory; the older ones are left to their files,
    but for the one a large change ended (that change is in no file). Once the database takes
    writes, the next fold writes every generation (the spilled ones read back from their
    files): the table read back from the database is the table."""
    state_dir = tmp_path / "s"
    w, table = _logged_space(state_dir, fold_bytes=1)  # every append fills its generation
    try:
        w.submit(lambda: None).result()  # the share's fold is done
        with _folds_refused(state_dir):
            for i in range(30):
                if i == 10:  # ends generation 11 and is folded with it, from memory only
                    table.grant("large", 50 * PAGE, PAGE, Access.RW)
                    w.log_large(capture("sp-0000abcd", table, ("large",)))
                table.grant(f"c{i}", i * PAGE, PAGE, Access.RW if i % 2 else Access.RO)
                w.log(capture("sp-0000abcd", table, (f"c{i}",)))
            w.submit(lambda: None).result()  # the thread is past every fold that failed
            assert w.unfolded == 31
            assert w.unfolded_in_memory == UNFOLDED_IN_MEMORY + 1 < 31
            in_memory = [gen for gen, changes in w.journal._unfolded if changes is not None]
            assert in_memory == [11, *range(31 - UNFOLDED_IN_MEMORY + 1, 32)]
            assert w.errors["fold"] == 31
        table.grant("last", 40 * PAGE, PAGE, Access.RO)
        w.log(capture("sp-0000abcd", table, ("last",)))
        w.submit(lambda: None).result()
        assert w.unfolded == 0
        assert [p.name for p in _log_files(state_dir)] == ["changes.33.log"]
        _journal_holds(w, table)
    finally:
        w.close()


def test_a_large_change_is_folded_with_the_generation_it_ends(tmp_path: Path) -> None:
    """A change writing more than LARGE_CHANGE_BYTES is not appended on the loop: the log's
    generation ends with it and is folded, it last, into the database on the journal's
    thread; the changes after it go to the next generation. A start that finds that
    generation unfolded (the daemon died before the fold: the large change's call never
    returned) replays it without the large change, and the next generation after it."""
    state_dir = tmp_path / "s"
    w, table = _logged_space(state_dir)
    table.set_shared(0, 64 * PAGE)
    table.grant("small", 0, PAGE, Access.RW)
    w.log(capture("sp-0000abcd", table, ("small",)))
    # A set written whole: 70,000 fragments' columns, 1.1 MB.
    big = Change(
        "sp-0000abcd",
        table.seq + 1,
        None,
        {"big": ClientSets(Sets.of(RangeSet((2 * i, 2 * i + 1) for i in range(70_000))), EMPTY)},
    )
    assert change_bytes(big) > LARGE_CHANGE_BYTES
    ended = w.changes.gen
    w.log_large(big).result()
    assert w.changes.gen == ended + 1 and w.journal.log_generation() == ended + 1
    assert [p.name for p in _log_files(state_dir)] == [f"changes.{ended + 1}.log"]
    [state] = w.journal.load().spaces
    assert state.seq == big.seq and len(state.grants["big"].readable) == 70_000
    assert "small" in state.grants
    w.close()

    # The daemon dies before a large change's fold commits: its generation's file stays.
    w, table = _logged_space(tmp_path / "t")
    table.grant("a", 0, PAGE, Access.RW)
    w.log(capture("sp-0000abcd", table, ("a",)))
    seq_before = table.seq
    gen = w.changes.gen
    with pytest.MonkeyPatch.context() as mp:
        # The thread never gets to it: as if killed first.
        mp.setattr(w, "submit", lambda fn, *args, kind="write": concurrent.futures.Future())
        w.log_large(dataclasses.replace(big, seq=table.seq + 1))
    table.grant("b", PAGE, PAGE, Access.RO)  # a later change of another client
    w.log(capture("sp-0000abcd", table, ("b",)))
    w._pool.shutdown()
    w.changes.close()
    w.journal.close()
    assert [p.name for p in _log_files(tmp_path / "t")] == [
        f"changes.{gen}.log",
        f"changes.{gen + 1}.log",
    ]
    w = Writer(Journal(tmp_path / "t"))
    try:
        [state] = w.journal.load().spaces
    finally:
        w.close()
    assert set(state.grants) == {"a", "b"} and state.seq == seq_before + 1


_SHORT_WRITER = r"""
import errno, resource, signal, sys
sys.path[:0] = [sys.argv[2] + "/clients", sys.argv[2] + "/broker"]
from pathlib import Path
from membrokerd.access import Access, AccessTable
from membrokerd.journal import ChangeLog, capture

# The file may not grow past 1,000 bytes: a write across that line is cut short there (the
# kernel writes what fits, then refuses with EFBIG), as a full disk would cut it.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
log = ChangeLog(Path(sys.argv[1]), 0)
table = AccessTable(64 * 4096)
table.set_shared(0, 64 * 4096)
for i in range(64):
    table.grant(f"client-{i}", i * 4096, 4096, Access.RW)
    try:
        log.append(capture("sp-0000abcd", table, (f"client-{i}",)))
    except OSError as exc:
        print(i, log.size, exc.errno, exc, flush=True)
        break
"""


def test_a_record_cut_short_by_the_disk_is_cut_off_again(tmp_path: Path) -> None:
    """A write that does not fit (the file size limit here, a full disk in production) leaves
    part of a record behind: the append fails, and the part is cut off, so the log holds
    whole records only (the next append would follow a whole one)."""
    state_dir = tmp_path / "s"
    state_dir.mkdir(mode=0o700)
    out = subprocess.run(
        [sys.executable, "-c", _SHORT_WRITER, str(state_dir), str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    failed_at, size = int(out[0]), int(out[1])
    # A part was written (the record straddled the limit), so the append said ENOSPC itself.
    assert 0 < failed_at < 64 and out[2] == str(errno.ENOSPC) and "took" in out
    path = state_dir / "changes.0.log"
    data = path.read_bytes()
    assert len(data) == size < 1000
    changes, used = read_log(data, path)
    assert used == len(data)  # no part of the refused record is left
    assert [sorted(c.clients) for c in changes] == [[f"client-{i}"] for i in range(failed_at)]
