"""`with va.access(...)`: a revocation waits for the block (bounded by the deadline)."""

from __future__ import annotations

import signal
import threading
import time

import membroker
from tests.conftest import ClientProc, Daemon, _env

PAGE = 4096
MiB = 1 << 20


def _revoke_in_thread(space, client, offset, length):
    box: dict[str, object] = {}

    def run() -> None:
        t0 = time.monotonic()
        box["report"] = space.revoke(client, offset, length)
        box["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _block_refused(backend, space_id, offset):
    """A new access() block over a page being revoked is refused (NotHeld)."""
    refused = backend.cmd("access_enter", space=space_id, offset=offset, length=PAGE)
    assert not refused["ok"] and refused["error"].startswith("NotHeld")


def _joined_report(thread, box):
    """The report of `_revoke_in_thread`, once it returned."""
    thread.join(30)
    report = box["report"]
    assert isinstance(report, membroker.RevocationReport)
    return report


def test_revoke_waits_for_the_access_block_and_the_block_reads_safely(tmp_path):
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "5000", env=_env())
    backend = None
    try:
        with membroker.connect("vmm", d.runtime_dir) as vmm:
            space = vmm.create_space(MiB)
            mem = space.map()
            mem.write(PAGE, b"\x2a")
            space.share(0, MiB)
            space.grant("backend", 0, 4 * PAGE)
            backend = ClientProc(d.runtime_dir, "backend")
            backend.ok("attach_va", space=space.space_id)
            backend.ok("access_enter", space=space.space_id, offset=PAGE, length=PAGE)
            thread, box = _revoke_in_thread(space, "backend", 0, 4 * PAGE)
            time.sleep(0.4)
            # The revoke is held back by the block, which still reads its pages safely ...
            assert thread.is_alive()
            assert backend.ok("access_read", space=space.space_id, index=0)["value"] == 0x2A
            # ... and returns, acknowledged, as soon as the block exits.
            backend.ok("access_exit", space=space.space_id)
            report = _joined_report(thread, box)
            assert [c.outcome for c in report.clients] == ["acked"]
            assert float(box["elapsed"]) >= 0.4  # type: ignore[arg-type]
            result = backend.cmd("touch", space=space.space_id, offset=PAGE)
            assert result.get("dead") and backend.wait() in (-signal.SIGSEGV, -signal.SIGBUS)
            mem.close()
    finally:
        if backend is not None:
            backend.close()
        assert d.stop() == 0


def test_a_block_that_outlives_the_deadline_loses_its_pages_not_its_session(tmp_path):
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "1000", env=_env())
    backend = None
    try:
        with membroker.connect("vmm", d.runtime_dir) as vmm:
            space = vmm.create_space(MiB)
            space.share(0, MiB)
            space.grant("backend", 0, 4 * PAGE)
            backend = ClientProc(d.runtime_dir, "backend")
            backend.ok("attach_va", space=space.space_id)
            backend.ok("access_enter", space=space.space_id, offset=0, length=PAGE)
            # A new block over a range being revoked is refused while the revoke waits.
            thread, box = _revoke_in_thread(space, "backend", 0, 4 * PAGE)
            time.sleep(0.2)
            _block_refused(backend, space.space_id, 2 * PAGE)
            report = _joined_report(thread, box)
            # Torn down at ~60 % of the deadline and acknowledged: not fenced.
            assert [c.outcome for c in report.clients] == ["acked"]
            assert 0.5 <= float(box["elapsed"]) < 1.0 + 5  # type: ignore[arg-type]
            assert vmm.stats().fenced_total == 0
            result = backend.cmd("access_read", space=space.space_id, index=0)
            assert result.get("dead") and backend.wait() in (-signal.SIGSEGV, -signal.SIGBUS)
    finally:
        if backend is not None:
            backend.close()
        assert d.stop() == 0


def test_a_large_revocation_waits_for_a_block_and_is_acknowledged_in_time(tmp_path):
    """50,000 fragments revoked at once while an access() block is open over one of them: the
    revocation waits for the block, a new block over another of its pages is refused meanwhile,
    and once the block exits the client tears everything down and acknowledges. (The client
    now marks the revoked ranges as one set; it used to mark and unmark each range in a list,
    one list.remove per range: quadratic, ~3 s at 200,000 ranges, past its deadline at a
    million.)"""
    fragments = 50_000
    size = 2 * fragments * PAGE
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "5000", env=_env())
    backend = None
    try:
        with membroker.connect("vmm", d.runtime_dir) as vmm:
            space = vmm.create_space(size)
            space.share(0, size)
            space.grant_many("backend", [(2 * i * PAGE, PAGE) for i in range(fragments)])
            backend = ClientProc(d.runtime_dir, "backend")
            attached = backend.ok("attach_va", space=space.space_id)
            assert len(attached["ranges"]) == fragments
            middle = 2 * (fragments // 2) * PAGE
            backend.ok("access_enter", space=space.space_id, offset=middle, length=PAGE)
            thread, box = _revoke_in_thread(space, "backend", 0, size)
            time.sleep(0.5)
            assert thread.is_alive()  # held back by the block
            _block_refused(backend, space.space_id, 0)
            backend.ok("access_exit", space=space.space_id)
            report = _joined_report(thread, box)
            assert [(c.outcome, c.reason) for c in report.clients] == [("acked", "")]
            assert report.revoked_bytes == fragments * PAGE
            assert backend.ok("ranges", space=space.space_id)["ranges"] == []
            assert vmm.stats().fenced_total == 0
    finally:
        if backend is not None:
            backend.close()
        assert d.stop() == 0
