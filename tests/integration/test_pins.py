"""Attributed pins: a revocation waits for them, then fails naming the pinner, or fences it."""

from __future__ import annotations

import threading
import time

import pytest

import membroker
from tests.conftest import ClientProc, Daemon, _env

PAGE = 4096
MiB = 1 << 20


@pytest.fixture
def world(tmp_path):
    """A daemon with a 500 ms deadline, an owner, a space and a pinning fd+offset client."""
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "500", env=_env())
    owner = membroker.connect("vmm", d.runtime_dir)
    space = owner.create_space(MiB)
    space.share(0, MiB)
    space.grant("dma", 0, 8 * PAGE)
    dma = ClientProc(d.runtime_dir, "dma")
    dma.ok("attach_fd", space=space.space_id)
    yield d, owner, space, dma
    dma.close()
    owner.close()
    assert d.stop() == 0


def test_pinned_range_fails_the_revoke_with_client_pid_and_offset(world):
    _, owner, space, dma = world
    pin_id = dma.ok("pin", space=space.space_id, offset=2 * PAGE, length=2 * PAGE)["pin_id"]
    seq = owner.get_space(space.space_id).seq
    t0 = time.monotonic()
    with pytest.raises(membroker.FailedPrecondition) as info:
        space.revoke("dma", 0, 8 * PAGE)
    waited = time.monotonic() - t0
    session_id = next(s.session_id for s in owner.list_sessions() if s.client == "dma")
    assert info.value.details == (
        f"offset 0x2000 is pinned by client 'dma' (session {session_id}, pid {dma.pid}, "
        f"pin {pin_id}) and was not unpinned within 500 ms; nothing changed"
    )
    assert waited >= 0.5  # it waited for the unpin before giving up
    # Nothing changed: same seq, same grants, the client still holds and pins its range.
    assert owner.get_space(space.space_id).seq == seq
    assert [(c, r.offset, r.length) for c, r in space.grants()] == [("dma", 0, 8 * PAGE)]
    assert dma.ok("ranges", space=space.space_id)["ranges"] == [[0, 8 * PAGE, "RW"]]
    assert [p.pin_id for p in owner.list_pins(space.space_id)] == [pin_id]
    # After the unpin the same revoke succeeds.
    dma.ok("unpin", pin_id=pin_id)
    report = space.revoke("dma", 0, 8 * PAGE)
    assert [c.outcome for c in report.clients] == ["acked"]


def test_revoke_waits_for_an_unpin_within_the_deadline_and_blocks_new_pins(world):
    _, _, space, dma = world
    pin_id = dma.ok("pin", space=space.space_id, offset=0, length=PAGE)["pin_id"]
    result: dict[str, object] = {}

    def revoke() -> None:
        t0 = time.monotonic()
        result["report"] = space.revoke("dma", 0, 8 * PAGE)
        result["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=revoke)
    thread.start()
    time.sleep(0.15)
    # While the revocation waits, nothing new may be pinned in its range.
    refused = dma.cmd("pin", space=space.space_id, offset=4 * PAGE, length=PAGE)
    assert not refused["ok"] and "is being revoked: no new pins" in refused["error"]
    dma.ok("unpin", pin_id=pin_id)
    thread.join(10)
    report = result["report"]
    assert isinstance(report, membroker.RevocationReport)
    assert [c.outcome for c in report.clients] == ["acked"]
    assert 0.15 <= float(result["elapsed"]) < 0.5 + 5  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["revoke", "unshare", "delete"])
def test_on_pinned_fence_fences_the_pinner_and_goes_on(world, how):
    d, owner, space, dma = world
    dma.ok("pin", space=space.space_id, offset=PAGE, length=PAGE)
    space.grant("other", 0, PAGE)
    if how == "revoke":
        report = space.revoke("dma", 0, 8 * PAGE, on_pinned="fence")
    elif how == "unshare":
        report = space.unshare(0, 8 * PAGE, on_pinned="fence")
    else:
        report = space.delete(on_pinned="fence")
    (fenced,) = [c for c in report.clients if c.client == "dma"]
    assert fenced.outcome == "fenced" and fenced.pid == dma.pid
    assert fenced.reason == "offset 0x1000 still pinned (pin 1) after 500 ms; disconnected"
    assert fenced.fence == "disconnected"
    assert [s.client for s in owner.list_sessions()] == ["vmm"]
    assert owner.stats().fenced_total == 1
    assert 'membroker_fenced_total{reason="pinned"} 1.0' in d.scrape()
    if how != "delete":
        assert [c for c, _ in space.grants()] == ["other"]
        assert owner.list_pins(space.space_id) == []


def test_a_large_batch_waits_only_for_the_pins_it_overlaps(tmp_path):
    """A revoke_many of 5,000 pages while the client holds three pins (one on a revoked page,
    two on pages the batch leaves alone): pins and ranges are matched through sets (15,000
    pairs), and the batch still fails naming the one pin in its way, changing nothing; once
    that pin goes it is acknowledged, and the other two pins are still held."""
    pages = 10_000
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "300", env=_env())
    try:
        with membroker.connect("vmm", d.runtime_dir) as owner:
            space = owner.create_space(pages * PAGE)
            space.share(0, pages * PAGE)
            space.grant("dma", 0, pages * PAGE)
            dma = ClientProc(d.runtime_dir, "dma")
            try:
                dma.ok("attach_fd", space=space.space_id)
                kept = [
                    dma.ok("pin", space=space.space_id, offset=page * PAGE, length=PAGE)["pin_id"]
                    for page in (1, 4_001)
                ]
                in_the_way = dma.ok(
                    "pin", space=space.space_id, offset=2 * 1_234 * PAGE, length=PAGE
                )["pin_id"]
                batch = [(2 * i * PAGE, PAGE) for i in range(pages // 2)]
                seq = owner.get_space(space.space_id).seq
                with pytest.raises(membroker.FailedPrecondition) as info:
                    space.revoke_many("dma", batch)
                assert info.value.details.startswith(
                    f"offset {2 * 1_234 * PAGE:#x} is pinned by client 'dma'"
                )
                assert f"pin {in_the_way})" in info.value.details
                assert owner.get_space(space.space_id).seq == seq
                assert [(c, r.offset, r.length) for c, r in space.grants()] == [
                    ("dma", 0, pages * PAGE)
                ]
                dma.ok("unpin", pin_id=in_the_way)
                (report,) = space.revoke_many("dma", batch)
                assert [c.outcome for c in report.clients] == ["acked"]
                assert report.revoked_bytes == pages // 2 * PAGE
                assert sorted(p.pin_id for p in owner.list_pins(space.space_id)) == kept
            finally:
                dma.close()
    finally:
        assert d.stop() == 0
