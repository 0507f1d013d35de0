"""Verified teardown and audits: the broker asks the kernel, not the client."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

import membroker
from tests.conftest import ClientProc, Daemon, _env, daemon_and_clients, wait_until

PAGE = 4096
MiB = 1 << 20


def _attachments(owner: membroker.Session, space: membroker.OwnedSpace) -> int:
    return owner.get_space(space.space_id).attachments


@pytest.fixture
def strict(tmp_path):
    """A daemon that verifies every acknowledgement and audits every 0.2 s."""
    with daemon_and_clients(tmp_path, 2000, 0.2) as world:
        yield world


@pytest.mark.parametrize("mode", ["cooperative", "sealed"])
@pytest.mark.parametrize("verify", ["always", "off"])
def test_client_that_acks_without_unmapping_is_caught_and_fenced(tmp_path, verify, mode):
    env = dict(_env(), MEMBROKER_VERIFY=verify, MEMBROKER_AUDIT_INTERVAL_S="0")
    d = Daemon(tmp_path / "rt", env=env)
    liar = honest = None
    try:
        with membroker.connect("vmm", d.runtime_dir) as owner:
            space = owner.create_space(MiB)
            space.share(0, MiB)
            space.grant("liar", 0, 4 * PAGE)
            space.grant("honest", 0, 4 * PAGE)
            liar, honest = ClientProc(d.runtime_dir, "liar"), ClientProc(d.runtime_dir, "honest")
            for c in (liar, honest):
                c.ok("attach_va", space=space.space_id, mode=mode)
                c.ok("touch", space=space.space_id, offset=PAGE)
            liar.ok("lie", space=space.space_id)

            report = space.revoke("liar", PAGE, PAGE)
            (outcome,) = report.clients
            if verify == "off":
                # Without verification the lie is believed: this is what the check is for.
                assert outcome.outcome == "acked"
                assert liar.ok("touch", space=space.space_id, offset=PAGE)["value"] == 0
                return
            assert outcome.outcome == "fenced"
            if mode == "sealed":
                # Its mapping is the broker's to fault in: what it kept is the present page.
                assert outcome.reason.startswith(
                    "acknowledged seq 4 but still has the page at offset 0x1000 present"
                )
            else:
                assert outcome.reason.startswith(
                    "acknowledged seq 4 but maps offset 0x1000 writable"
                )
                assert "with no guard marker" in outcome.reason
            # Its session closed, the SDK dropped the mapping: the fence achieved its aim.
            assert outcome.fence == "disconnected"
            assert outcome.reason.endswith("; disconnected")
            assert [c for c, _ in space.grants()] == ["honest"]
            assert owner.stats().fenced_total == 1

            # An honest client is verified and counted as acknowledged.
            report = space.revoke("honest", PAGE, PAGE)
            assert [c.outcome for c in report.clients] == ["acked"]
            assert sorted(s.client for s in owner.list_sessions()) == ["honest", "vmm"]
    finally:
        for c in (liar, honest):
            if c is not None:
                c.close()
        assert d.stop() == 0


def test_revoke_checks_pages_too_not_only_permissions(tmp_path):
    """A client that makes the pages PROT_NONE but keeps them mapped (no MADV_DONTNEED)."""
    env = dict(_env(), MEMBROKER_AUDIT_INTERVAL_S="0")
    d = Daemon(tmp_path / "rt", env=env)
    client = None
    try:
        with membroker.connect("vmm", d.runtime_dir) as owner:
            space = owner.create_space(MiB)
            space.share(0, MiB)
            space.grant("half", 0, 2 * PAGE)
            client = ClientProc(d.runtime_dir, "half")
            # mprotect is the cooperative mode's tool (a sealed mapping refuses it).
            client.ok("attach_va", space=space.space_id, mode="cooperative")
            client.ok("touch", space=space.space_id, offset=PAGE)
            client.ok("protect_only", space=space.space_id)
            (outcome,) = space.revoke("half", PAGE, PAGE).clients
            assert outcome.outcome == "fenced"
            assert "still has the page at offset 0x1000 present" in outcome.reason
    finally:
        if client is not None:
            client.close()
        assert d.stop() == 0


def test_audit_fences_a_client_that_maps_its_fd_beyond_its_grant(strict):
    d, start = strict
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("dma", 0, 4 * PAGE)
        space.grant("backend", 0, 4 * PAGE)
        backend = start("backend")
        backend.ok("attach_va", space=space.space_id)
        dma = start("dma")
        dma.ok("attach_fd", space=space.space_id)
        # Mapping what it holds is allowed: several audits pass without fencing anyone.
        dma.ok("map_fd", space=space.space_id, offset=0, length=4 * PAGE)
        time.sleep(0.8)
        assert owner.stats().fenced_total == 0
        # Mapping the fd again, over memory it holds no grant for, is not.
        dma.ok("map_fd", space=space.space_id, offset=0, length=MiB)
        deadline = time.monotonic() + 10
        while owner.stats().fenced_total == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert owner.stats().fenced_total == 1
        assert sorted(s.client for s in owner.list_sessions()) == ["backend", "vmm"]
        assert [c for c, _ in space.grants()] == ["backend"]
        assert 'membroker_fenced_total{reason="audit"} 1.0' in d.scrape()
        # The fenced client's next control call learns why.
        refused = dma.cmd("pin", space=space.space_id, offset=0, length=PAGE)
        assert not refused["ok"] and "fenced: audit of" in refused["error"]
        assert (
            "maps offset 0x4000 readable (rws)" in refused["error"]
            or "maps offset 0x4000 writable (rws)" in refused["error"]
        )
        assert dma.proc.poll() is None


def test_audit_fences_a_cooperative_client_that_reads_never_granted_pages_via_proc_mem(strict):
    """/proc/self/mem (FOLL_FORCE) reads through PROT_NONE and leaves the page present in the
    client's page table: the audit finds it, even though no revocation ever examines it. The
    page lies in a 2 MiB chunk where the client holds nothing (no guard markers there)."""
    d, start = strict
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space = owner.create_space(4 * MiB)
        space.share(0, 4 * MiB)
        space.grant("nosy", 0, 4 * PAGE)
        nosy = start("nosy")
        nosy.ok("attach_va", space=space.space_id, mode="cooperative")
        time.sleep(0.8)  # several audits of the honest client: nobody fenced
        assert owner.stats().fenced_total == 0
        got = nosy.ok("procmem_read", space=space.space_id, offset=3 * MiB)
        assert "data" in got, got  # the read went through PROT_NONE
        deadline = time.monotonic() + 10
        while owner.stats().fenced_total == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert owner.stats().fenced_total == 1
        assert 'membroker_fenced_total{reason="audit"} 1.0' in d.scrape()


def _attached_keeping(sly: ClientProc, space_id: str, kept: str) -> ClientProc:
    """`sly` attached and holding what it will keep: an fd ("fd"), an fd and a mapping of it
    the SDK does not know of ("mapping"), or a VA mapping with a page present ("va"; sealed,
    the mapping cannot go, so its pages must)."""
    if kept == "va":
        sly.ok("attach_va", space=space_id)
        sly.ok("touch", space=space_id, offset=PAGE)
    else:
        sly.ok("attach_fd", space=space_id)
    if kept == "mapping":
        sly.ok("map_fd", space=space_id, offset=0, length=4 * PAGE)
    return sly


@pytest.mark.parametrize("kept", ["fd", "mapping", "va"])
def test_a_client_that_detaches_but_keeps_the_space_is_fenced(strict, kept):
    """A detach says "I let go": the broker looks, and a client that kept its fd (or a mapping
    of it) is fenced, and killed since it still reaches the space. An honest detach (the SDK's
    close) is not."""
    d, start = strict
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("honest", 0, 4 * PAGE)
        space.grant("sly", 0, 4 * PAGE)
        honest = start("honest")
        honest.ok("attach_fd", space=space.space_id)
        honest.ok("close", space=space.space_id)
        sly = _attached_keeping(start("sly"), space.space_id, kept)
        sly.ok("detach_keeping", space=space.space_id)
        assert wait_until(lambda: owner.stats().fenced_total == 1)
        if kept == "mapping":
            # A mapping the SDK does not know of outlives the fence's grace: killed.
            assert sly.wait(10) == -signal.SIGKILL
        else:
            # The SDK drops its fd (or mapping) when told it was fenced: disconnected, alive.
            assert wait_until(lambda: 'result="disconnected"} 1.0' in d.scrape())
            assert sly.proc.poll() is None
        assert 'membroker_fenced_total{reason="detach"} 1.0' in d.scrape()
        log = d.log()
        assert f"detached from {space.space_id} but still reaches it" in log
        assert [s.client for s in owner.list_sessions() if s.client == "honest"] == ["honest"]


@pytest.mark.parametrize("kept", ["fd", "mapping", "va"])
def test_a_client_that_ends_its_session_but_keeps_the_space_is_fenced(strict, kept):
    """Ending a session says "I let go" of every space, like a detach: the broker looks at the
    process once the session is over. One that kept an fd or a mapping is fenced for it
    (reason "closed") and, since nothing tells it any more, killed after the fence grace. An
    SDK session closed with its attachments still open lets go of them first: not fenced."""
    d, start = strict
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("honest", 0, 4 * PAGE)
        space.grant("sly", 0, 4 * PAGE)
        honest = start("honest")
        honest.ok("attach_va", space=space.space_id)
        honest.ok("touch", space=space.space_id, offset=PAGE)
        honest.ok("close_session")
        sly = _attached_keeping(start("sly"), space.space_id, kept)
        sly.ok("end_session_keeping")
        assert sly.wait(10) == -signal.SIGKILL
        assert wait_until(lambda: owner.stats().fenced_total == 1)
        metrics = d.scrape()
        assert 'membroker_fenced_total{reason="closed"} 1.0' in metrics
        assert wait_until(lambda: 'result="killed"} 1.0' in d.scrape())
        assert f"ended its session but still reaches {space.space_id}" in d.log()
        # The honest one let go before its session ended: alive, not fenced, grants intact.
        assert honest.proc.poll() is None
        assert honest.ok("session_state")["closed"]
        assert [(c, r.offset, r.length) for c, r in space.grants("honest")] == [
            ("honest", 0, 4 * PAGE)
        ]


@contextlib.contextmanager
def _one_client_under_audits(
    tmp_path: Any, name: str, deadline_ms: int = 2000
) -> Iterator[tuple[Any, Any, Any, Any]]:
    """A daemon that audits every 10 ms (with this revoke deadline), its owner, a 1 MiB shared
    space and a client process `name` granted its first four pages (not attached yet)."""
    with (
        daemon_and_clients(tmp_path, deadline_ms, 0.01) as (d, start),
        membroker.connect("vmm", d.runtime_dir) as owner,
    ):
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant(name, 0, 4 * PAGE)
        yield d, owner, space, start(name)


def test_a_client_that_dies_during_an_audit_is_gone_not_fenced(tmp_path):
    """A dying process drops its memory (/proc reads of it fail with ESRCH) tens of
    milliseconds before its pidfd says it exited (here ~75 ms, freeing 1 GiB). Audits every
    10 ms look at it in that window: it is gone, not a live process hiding its mappings."""
    with _one_client_under_audits(tmp_path, "big") as (d, owner, space, big):
        big.ok("ballast", mib=1024)
        big.ok("attach_va", space=space.space_id)
        big.ok("touch", space=space.space_id, offset=PAGE)
        time.sleep(0.1)  # a few audits of the live client: nothing to find
        os.kill(big.pid, signal.SIGKILL)
        assert big.wait(10) == -signal.SIGKILL
        assert wait_until(lambda: _attachments(owner, space) == 0)
        time.sleep(0.3)  # audits and their follow-ups settle
        assert owner.stats().fenced_total == 0, d.log()[-2000:]
        assert "membroker_audit_unverified_total 0.0" in d.scrape()


def test_audits_leave_a_sealed_client_alone_while_it_maps_and_judge_it_after(tmp_path):
    """Between its attach and the broker's check of its sealed mapping, a VA client maps the
    whole space read-write, before any page of it faults through the broker: an audit (here
    every 10 ms) that judged it then fenced an honest client. It is judged once its mapping is
    done, or once the revoke deadline has passed without it."""
    with _one_client_under_audits(tmp_path, "slow") as (d, owner, space, slow):
        assert (
            slow.ok("attach_va_rogue", space=space.space_id, how="slow_seal", delay=0.3)["mode"]
            == "sealed"
        )
        assert slow.ok("touch", space=space.space_id, offset=PAGE)["value"] == 0
        time.sleep(0.1)  # audits of the finished mapping: nothing to find
        assert owner.stats().fenced_total == 0, d.log()[-2000:]
        # Judged again after its mapping is done: it keeps what it holds, and no more.
        slow.ok("lie", space=space.space_id)
        report = space.revoke("slow", PAGE, PAGE)
        ((outcome, reason),) = [(c.outcome, c.reason) for c in report.clients]
        assert outcome == "fenced", reason


def test_a_client_that_stays_unchecked_past_the_deadline_is_audited_and_fenced(tmp_path):
    """The other side of the window above: a client that holds the whole space mapped
    read-write and does not get its mapping checked (here: it takes 3 s to seal, against a
    revoke deadline of 0.3 s) is audited once the deadline has passed, and fenced for the
    pages it does not hold."""
    with _one_client_under_audits(tmp_path, "stall", deadline_ms=300) as (d, owner, space, c):
        out = c.cmd("attach_va_rogue", space=space.space_id, how="slow_seal", delay=3.0)
        assert not out.get("ok"), out
        assert wait_until(lambda: owner.stats().fenced_total == 1)
        assert f"audit of {space.space_id}: maps offset 0x4000 writable (rws)" in d.log()
        assert [g for g, _ in space.grants()] == []
