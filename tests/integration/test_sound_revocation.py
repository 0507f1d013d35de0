"""Sound revocation: the promise holds under cancellation, concurrency and lying clients.

When a call that takes access away returns, every client that could reach those pages either
provably (by the kernel's view) cannot any more, or has been fenced and the report says how; no
compliant client is fenced. Each test is a regression of something seen on an earlier build,
with a real daemon and real client processes; the hostile ones do what the SDK never would.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

import membroker
from membroker.errors import BrokerError, NotFound
from membroker.v1 import broker_pb2 as pb
from membroker.v1 import session_pb2 as spb
from tests.conftest import ClientProc, Daemon, _env, daemon_and_clients, stop_process
from tests.integration.test_identity import as_nobody, daemon_with, stop_and_clean

PAGE = 4096
MiB = 1 << 20
NOBODY = 65534


def _wait_for(predicate, timeout: float = 10.0, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@pytest.fixture
def quiet(tmp_path):
    """A daemon with a 1 s deadline and no periodic audit (only revocations verify)."""
    with daemon_and_clients(tmp_path, 1000, 0) as world:
        yield world


def _attached(owner: Any, start: Any, name: str, op: str) -> tuple[Any, Any]:
    """A 1 MiB shared space of `owner` with its first 4 pages granted (rw) to client `name`, and
    that client's process attached to it (`op`: attach_va or attach_fd)."""
    space = owner.create_space(MiB)
    space.share(0, MiB)
    space.grant(name, 0, 4 * PAGE)
    client = start(name)
    client.ok(op, space=space.space_id)
    return space, client


def test_a_cancelled_revoke_still_waits_verifies_and_fences(quiet):
    """Item 1: the owner's call gives up after 0.3 s; the revocation does not."""
    d, start = quiet
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space, stuck = _attached(owner, start, "stuck", "attach_va")
        stuck.ok("touch", space=space.space_id, offset=0)
        stop_process(stuck.pid)
        request = pb.RevokeRequest(
            space_id=space.space_id, client="stuck", range=spb.Range(offset=0, length=4 * PAGE)
        )
        with pytest.raises(BrokerError) as caught:
            owner.call("Revoke", request, timeout=0.3)
        assert "DEADLINE_EXCEEDED" in str(caught.value.code)
        # The table change stands, and the revocation carries on to the fencing.
        assert space.grants() == []
        assert _wait_for(lambda: owner.stats().fenced_total == 1)
        (report,) = _wait_for(lambda: space.revocations())
        assert report.caller_gone is True
        assert report.cause == "revoke"
        ((client, outcome, fence),) = [(c.client, c.outcome, c.fence) for c in report.clients]
        assert (client, outcome) == ("stuck", "fenced")
        # Frozen with the page still mapped: killed after the disconnect, and the report says so.
        assert fence == "killed"
        assert stuck.wait(10) == -signal.SIGKILL
        # Nothing is left waiting: a later change of the same space runs at once.
        assert space.share(0, PAGE).clients == ()


def test_a_grant_racing_a_revoke_never_fences_the_honest_client(quiet):
    """Item 2: unshare a page while the client is busy with it; re-share it meanwhile. The
    share waits its turn, the client acks the unshare (verified against what it holds then),
    and nobody is fenced."""
    d, start = quiet
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space, busy = _attached(owner, start, "busy", "attach_va")
        busy.ok("write", space=space.space_id, offset=PAGE, data="ab")
        busy.ok("access_enter", space=space.space_id, offset=PAGE, length=PAGE)
        reports: dict[str, object] = {}

        def unshare() -> None:
            reports["unshare"] = space.unshare(PAGE, PAGE)

        def reshare() -> None:
            reports["share"] = space.share(PAGE, PAGE)

        first = threading.Thread(target=unshare)
        first.start()
        time.sleep(0.3)
        second = threading.Thread(target=reshare)
        second.start()
        time.sleep(0.2)
        assert "share" not in reports  # queued behind the unshare, not interleaved
        busy.ok("access_exit", space=space.space_id)
        first.join(10)
        second.join(10)
        unshared = reports["unshare"]
        assert [(c.client, c.outcome) for c in unshared.clients] == [("busy", "acked")]
        assert reports["share"].seq == unshared.seq + 1
        assert owner.stats().fenced_total == 0
        # The re-shared page is the client's again, with its bytes.
        assert _wait_for(
            lambda: busy.ok("ranges", space=space.space_id)["ranges"] == [[0, 4 * PAGE, "RW"]]
        )
        assert busy.ok("read", space=space.space_id, offset=PAGE, length=1)["data"] == "ab"


def test_concurrent_delete_and_revoke_each_get_their_own_seq(quiet):
    """Item 3: a DeleteSpace waiting on a pin, and a Revoke of the same space 0.1 s later."""
    d, start = quiet
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space, dma = _attached(owner, start, "dma", "attach_fd")
        pin = dma.ok("pin", space=space.space_id, offset=0, length=PAGE)["pin_id"]
        results: dict[str, object] = {}

        def delete() -> None:
            results["delete"] = space.delete()

        def revoke() -> None:
            try:
                results["revoke"] = space.revoke("dma", 0, PAGE)
            except NotFound as exc:
                results["revoke"] = exc

        t1 = threading.Thread(target=delete)
        t1.start()
        time.sleep(0.1)
        t2 = threading.Thread(target=revoke)
        t2.start()
        time.sleep(0.3)
        dma.ok("unpin", pin_id=pin)
        t1.join(10)
        t2.join(10)
        deleted = results["delete"]
        assert [(c.client, c.outcome) for c in deleted.clients] == [("dma", "acked")]
        # The revoke ran after the delete, found no space, and changed nothing.
        assert isinstance(results["revoke"], NotFound)
        assert "deleted meanwhile" in str(results["revoke"])
        assert owner.stats().fenced_total == 0
        assert dma.proc.poll() is None
        # The honest client was never told it acknowledged something it was not asked.
        assert "not asked to acknowledge" not in d.log()


@pytest.mark.parametrize("looked_at", [False, True], ids=["first_look", "walked"])
@pytest.mark.parametrize("keep_fd", [False, True])
def test_a_second_mapping_defeats_no_verification(quiet, keep_fd, looked_at):
    """Item 4: the client reports a decoy address, keeps a second read-write mapping of its
    granted pages (made from /proc/self/map_files, no fd from the broker) and acks. Judged on
    its first revocation (maps text, on a worker thread) and on a later one (after an honest
    revocation: a PROCMAP_QUERY walk on the loop)."""
    d, start = quiet
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space, sly = _attached(owner, start, "sly", "attach_va")
        seq = 3
        if looked_at:
            assert space.revoke("sly", 3 * PAGE, PAGE).all_acked
            space.grant("sly", 3 * PAGE, PAGE)
            seq = 5
        sly.ok("second_map", space=space.space_id, offset=0, length=4 * PAGE, keep_fd=keep_fd)
        sly.ok("report_mapped", space=space.space_id)
        assert sly.ok("second_read", offset=PAGE)["value"] == 0
        report = space.revoke("sly", PAGE, PAGE)
        ((outcome, reason, fence),) = [(c.outcome, c.reason, c.fence) for c in report.clients]
        assert outcome == "fenced"
        if keep_fd:
            assert reason.startswith(f"acknowledged seq {seq} but holds fd ")
            assert "of the space, which it may not" in reason
        else:
            assert reason.startswith(
                f"acknowledged seq {seq} but maps offset 0x1000 writable (rws)"
            )
        # It kept the second mapping after the disconnect: killed.
        assert fence == "killed"
        assert sly.wait(10) == -signal.SIGKILL


def test_a_client_that_execs_is_still_verified_in_its_new_image(quiet):
    """A client replaces its program image after Hello, keeping the session socket and the
    space's fd: files the broker opened on /proc/PID at Hello read as empty for the new image,
    which must not pass for "maps nothing". The new image maps its grant, closes the fd and
    acks a revoke without unmapping: fenced, and killed since it still maps the page."""
    d, start = quiet
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space, shifty = _attached(owner, start, "shifty", "attach_fd")
        shifty.ok("exec_liar", space=space.space_id, length=4 * PAGE)
        image = shifty._read(30)
        assert image.get("ready") and image["pid"] == shifty.pid, image
        assert shifty.ok("read", offset=PAGE)["value"] == 0  # the new image's own mapping
        report = space.revoke("shifty", PAGE, PAGE)
        ((outcome, reason, fence),) = [(c.outcome, c.reason, c.fence) for c in report.clients]
        assert outcome == "fenced", report
        assert reason.startswith("acknowledged seq 3 but maps offset 0x1000 writable"), reason
        assert fence == "killed"
        assert shifty.wait(10) == -signal.SIGKILL


def test_an_honest_client_with_a_wrong_report_is_still_verified_not_fenced(quiet):
    d, start = quiet
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space, odd = _attached(owner, start, "odd", "attach_va")
        odd.ok("touch", space=space.space_id, offset=PAGE)
        odd.ok("report_mapped", space=space.space_id)
        report = space.revoke("odd", PAGE, PAGE)
        assert [(c.outcome, c.reason) for c in report.clients] == [("acked", "")]


def test_a_client_name_belongs_to_the_uid_that_used_it_first(tmp_path):
    """Item 5: a process of another uid cannot take a disconnected owner's name (and so can
    neither inherit its exemption nor the grants addressed to that name)."""
    d = daemon_with(
        tmp_path, session_socket_mode="0666", control_socket_mode="0666", audit_interval_s="0"
    )
    try:
        with membroker.connect("vmm", d.runtime_dir) as owner:
            space = owner.create_space(MiB)
            space.share(0, MiB)
            space.grant("vmm", 0, MiB)
        taken = as_nobody(d, "vmm", "attach", space.space_id)
        assert taken["ok"] is False
        assert "client name 'vmm' is bound to uid 0, which used it first" in str(taken["message"])
        # Another name is fine for that uid; the owner's name still works for the owner.
        assert as_nobody(d, "guest", "connect")["ok"] is True
        with membroker.connect("vmm", d.runtime_dir) as owner:
            assert owner.get_space(space.space_id).attachments == 0
    finally:
        stop_and_clean(d)


def test_a_teardown_that_fails_is_refused_not_acked(quiet):
    """Item 10: an fd client whose teardown callback fails says so; the broker fences it and
    the report names the failure."""
    d, start = quiet
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space, slot = _attached(owner, start, "vmmslot", "attach_fd")
        slot.ok("refuse_revokes", space=space.space_id)
        report = space.revoke("vmmslot", 0, PAGE)
        ((outcome, reason, fence),) = [(c.outcome, c.reason, c.fence) for c in report.clients]
        assert outcome == "fenced"
        assert reason.startswith("refused to tear down seq 3: ")
        assert "memslot delete failed: EBUSY" in reason
        # The SDK closes the fd when its session ends: the fence achieved its aim.
        assert fence == "disconnected"
        assert owner.stats().fenced_total == 1


def test_split_pushes_and_snapshots_cross_real_frames(tmp_path):
    """Item 7: with 1 KiB frames, a 1,100-fragment pattern attaches (snapshot frames), is
    revoked wholesale (one revocation in many Revoke frames, one ack) and granted back."""
    env = dict(_env(), MEMBROKER_AUDIT_INTERVAL_S="0", MEMBROKER_MAX_FRAME_BYTES="1024")
    d = Daemon(tmp_path / "rt", env=env)
    client = None
    fragments = 1100
    try:
        with membroker.connect("vmm", d.runtime_dir) as owner:
            size = 2 * fragments * PAGE
            space = owner.create_space(size)
            space.share(0, size)
            for i in range(fragments):
                space.grant("frag", 2 * i * PAGE, PAGE, "rw")
            client = ClientProc(d.runtime_dir, "frag")
            ranges = client.ok("attach_va", space=space.space_id)["ranges"]
            assert len(ranges) == fragments
            assert ranges[-1] == [2 * (fragments - 1) * PAGE, PAGE, "RW"]
            client.ok("write", space=space.space_id, offset=2 * 700 * PAGE, data="77")
            report = space.revoke("frag", 0, size)
            assert [(c.client, c.outcome) for c in report.clients] == [("frag", "acked")]
            assert report.revoked_bytes == fragments * PAGE
            assert client.ok("ranges", space=space.space_id)["ranges"] == []
            space.grant("frag", 0, size, "ro")
            assert _wait_for(
                lambda: client.ok("ranges", space=space.space_id)["ranges"] == [[0, size, "RO"]]
            )
            got = client.ok("read", space=space.space_id, offset=2 * 700 * PAGE, length=1)
            assert got["data"] == "77"
            assert owner.stats().fenced_total == 0
    finally:
        if client is not None:
            client.close()
        assert d.stop() == 0, d.log()


def test_a_batch_is_one_change_and_one_acknowledged_revocation(quiet):
    d, start = quiet
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space = owner.create_space(MiB)
        (shared,) = space.share_many([(0, 8 * PAGE), (16 * PAGE, 8 * PAGE)])
        seq = space.grant_many("va", [(0, 2 * PAGE), (4 * PAGE, PAGE), (16 * PAGE, 4 * PAGE)])
        assert seq == shared.seq + 1
        va = start("va")
        assert va.ok("attach_va", space=space.space_id)["ranges"] == [
            [0, 2 * PAGE, "RW"],
            [4 * PAGE, PAGE, "RW"],
            [16 * PAGE, 4 * PAGE, "RW"],
        ]
        for offset in (0, 4 * PAGE, 17 * PAGE):
            va.ok("touch", space=space.space_id, offset=offset)
        (report,) = space.unshare_many([(PAGE, PAGE), (4 * PAGE, 4 * PAGE), (18 * PAGE, PAGE)])
        assert report.seq == seq + 1
        assert [(c.client, c.outcome) for c in report.clients] == [("va", "acked")]
        assert report.revoked_bytes == 3 * PAGE
        assert va.ok("ranges", space=space.space_id)["ranges"] == [
            [0, PAGE, "RW"],
            [16 * PAGE, 2 * PAGE, "RW"],
            [19 * PAGE, PAGE, "RW"],
        ]
        (report,) = space.revoke_many("va", [(0, PAGE), (19 * PAGE, PAGE)])
        assert report.revoked_bytes == 2 * PAGE and report.all_acked
        assert owner.stats().fenced_total == 0


@pytest.mark.parametrize("lie", [False, True])
def test_a_large_revocation_is_verified_off_the_loop_all_the_same(quiet, lie):
    """30,000 fragments revoked at once: encoded and verified on worker threads (the loop stays
    free), judged as strictly as a small one."""
    d, start = quiet
    fragments = 30_000
    size = 2 * fragments * PAGE
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space = owner.create_space(size)
        space.share(0, size)
        space.grant_many("many", [(2 * i * PAGE, PAGE) for i in range(fragments)], "rw")
        listed = space.grants()  # three pages of ListGrants
        assert len(listed) == fragments and listed[-1][1].offset == 2 * (fragments - 1) * PAGE
        many = start("many")
        attached = many.ok("attach_va", space=space.space_id)
        assert len(attached["ranges"]) == fragments
        many.ok("write", space=space.space_id, offset=2 * 777 * PAGE, data="5a")
        if lie:
            many.ok("lie", space=space.space_id)
        report = owner.call(
            "Revoke",
            pb.RevokeRequest(
                space_id=space.space_id, client="many", range=spb.Range(offset=0, length=size)
            ),
            timeout=60,
        )
        (outcome,) = report.clients
        if lie:
            assert outcome.outcome == pb.OUTCOME_FENCED, outcome.reason
            # The first page it kept, found among 30,000 ranges by one scan of its page tables:
            # sealed, the one page it wrote (the broker faulted in nothing else, and
            # write-protected it before pushing the revoke); cooperative,
            # the first page of its writable, unguarded mapping.
            if attached["mode"] == "sealed":
                assert outcome.reason.startswith(
                    f"acknowledged seq {report.seq} but still has the page at offset "
                    f"{2 * 777 * PAGE:#x} present"
                )
            else:
                assert outcome.reason.startswith(
                    f"acknowledged seq {report.seq} but maps offset 0x0 writable (rws)"
                )
            assert outcome.fence == pb.FENCE_RESULT_DISCONNECTED
        else:
            assert outcome.outcome == pb.OUTCOME_ACKED, outcome.reason
            assert report.revoked_bytes == fragments * PAGE
            assert many.ok("ranges", space=space.space_id)["ranges"] == []


def _read_error(sock) -> str:
    """The Error frame the broker sends before closing a refused connection."""
    from membroker import wire

    decoder = wire.FrameDecoder()
    sock.settimeout(10)
    while True:
        data = sock.recv(65536)
        if not data:
            return ""
        for frame, _ in decoder.feed(data, []):
            if frame.WhichOneof("body") == "error":
                return frame.error.message


def test_hello_less_connections_lock_out_only_their_own_uid_and_briefly(tmp_path):
    """Item 9: connections that never say Hello are capped per uid and dropped at the Hello
    timeout; other users are never locked out."""
    import socket

    d = daemon_with(
        tmp_path,
        session_socket_mode="0666",
        control_socket_mode="0666",
        max_pending_hellos_per_uid="4",
        hello_timeout_s="1.0",
    )
    silent = []
    try:
        path = str(d.runtime_dir / "session.sock")
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            silent.append(s)
        time.sleep(0.2)  # accepted and counted
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.connect(path)
        silent.append(extra)
        assert "waiting to say Hello (limit max_pending_hellos_per_uid = 4)" in _read_error(extra)
        # An honest client of that uid is slowed, not refused: the SDK asks again (BrokerBusy)
        # until the silent ones are gone.
        waited: dict[str, object] = {}

        def honest() -> None:
            t0 = time.monotonic()
            try:
                with membroker.connect("vmm", d.runtime_dir, timeout=10) as owner:
                    waited["ping"] = owner.ping()
            except Exception as exc:
                waited["error"] = exc
            waited["s"] = time.monotonic() - t0

        retrying = threading.Thread(target=honest)
        retrying.start()
        with pytest.raises(membroker.BrokerBusy):  # what it is told meanwhile
            membroker.connect("vmm2", d.runtime_dir, timeout=0.05)
        # Another uid is not affected.
        assert as_nobody(d, "guest", "connect")["ok"] is True
        # The silent ones are dropped at the Hello timeout, with a reason ...
        assert "no Hello within 1 s (hello_timeout_s)" in _read_error(silent[0])
        # ... and the honest client got in then.
        retrying.join(15)
        assert "error" not in waited, waited
        assert 0.3 < float(waited["s"]) < 8, waited  # type: ignore[arg-type]
    finally:
        for s in silent:
            s.close()
        stop_and_clean(d)


def test_a_fenced_client_behind_in_reading_still_learns_why(tmp_path):
    """A client frozen while the broker queues more than its socket holds (here 64k grant
    fragments), then fenced for the revoke it could not acknowledge: once it runs again and
    reads what its socket already holds, it finds the Goodbye with the fence's reason, not a
    bare end of stream (which the SDK would take for a restart, and try to resume)."""
    env = dict(_env(), MEMBROKER_AUDIT_INTERVAL_S="0", MEMBROKER_ON_FENCED_STILL_MAPPED="report")
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "300", env=env)
    slow = None
    try:
        with membroker.connect("vmm", d.runtime_dir) as owner:
            space = owner.create_space(512 << 20)
            space.share(0, 512 << 20)
            space.grant("slow", 0, PAGE)
            slow = ClientProc(d.runtime_dir, "slow")
            slow.ok("attach_fd", space=space.space_id)
            stop_process(slow.pid)
            space.grant_many("slow", [(2 * i * PAGE, PAGE) for i in range(1, 65536)])
            report = space.revoke("slow", 0, PAGE)
            [(outcome, fence, reason)] = [(c.outcome, c.fence, c.reason) for c in report.clients]
            assert (outcome, fence) == ("fenced", "still_mapped"), reason
            assert "no acknowledgement of seq" in reason
            os.kill(slow.pid, signal.SIGCONT)
            assert _wait_for(lambda: slow.ok("session_state")["closed"])
            state = slow.ok("session_state", call=True)
            assert state["fenced"], state
            assert state["reason"].startswith("fenced: no acknowledgement of seq"), state
            assert "SessionClosed" in state["error"] and "no acknowledgement" in state["error"]
    finally:
        try:
            if slow is not None:
                os.kill(slow.pid, signal.SIGCONT)
                slow.close()
        finally:
            d.stop()


def test_a_client_that_acknowledges_too_late_learns_it_was_fenced(tmp_path):
    """An honest client whose teardown outlasts the deadline (its on_revoke sleeps 1.5 s
    against 300 ms) is fenced meanwhile. When its handler returns, it sends the late
    acknowledgement into a closed connection: it must still read the Goodbye the broker left
    in its socket and end as fenced, with the reason, not take the lost connection for a
    restart and try to resume. (It keeps its fd: the broker reports that instead of killing
    it, so that it lives to tell.)"""
    env = dict(_env(), MEMBROKER_AUDIT_INTERVAL_S="0", MEMBROKER_ON_FENCED_STILL_MAPPED="report")
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "300", env=env)
    late = None
    try:
        with membroker.connect("vmm", d.runtime_dir) as owner:
            space = owner.create_space(MiB)
            space.share(0, MiB)
            space.grant("late", 0, PAGE)
            late = ClientProc(d.runtime_dir, "late")
            late.ok("attach_fd", space=space.space_id)
            late.ok("slow_revokes", space=space.space_id, delay=1.5)
            report = space.revoke("late", 0, PAGE)
            [(outcome, reason)] = [(c.outcome, c.reason) for c in report.clients]
            assert outcome == "fenced" and "no acknowledgement of seq" in reason, reason
            assert _wait_for(lambda: late.ok("session_state")["closed"])
            state = late.ok("session_state", call=True)
            assert state["fenced"], state
            assert state["reason"].startswith("fenced: no acknowledgement of seq"), state
            assert "SessionClosed" in state["error"], state
            assert owner.stats().fenced_total == 1
    finally:
        try:
            if late is not None:
                late.close()
        finally:
            d.stop()


def _metric(d: Any, name: str) -> float:
    """One sample of the daemon's /metrics (0 when absent)."""
    for line in d.scrape().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_busy_with_its_mmap_lock_is_judged_on_a_worker_and_still_verified(quiet):
    """README, "A stall of the event loop now and then": a client that keeps its mmap lock
    taken (mprotect of a populated 512 MiB mapping, in a loop) makes a walk of its mappings
    sleep. The first such walk is counted (membroker_slow_walks_total); its acknowledgements
    are then judged from the maps text on a worker thread, and verified all the same. Once it
    lets go and the pause has passed, they are walked on the loop again."""
    d, start = quiet
    loop = 'membroker_verify_seconds_count{where="loop"}'
    worker = 'membroker_verify_seconds_count{where="worker"}'
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space, busy = _attached(owner, start, "busy", "attach_va")
        assert space.revoke("busy", PAGE, PAGE).all_acked  # its first look: the maps text
        space.grant("busy", PAGE, PAGE)
        walked = _metric(d, loop)
        assert space.revoke("busy", PAGE, PAGE).all_acked
        space.grant("busy", PAGE, PAGE)
        assert _metric(d, loop) == walked + 1  # looked at before: walked on the loop
        assert _metric(d, "membroker_slow_walks_total") == 0
        busy.ok("hold_mmap_lock", mib=512)
        deadline = time.monotonic() + 20
        while _metric(d, "membroker_slow_walks_total") == 0:
            assert time.monotonic() < deadline, "no walk of the busy client ever slept"
            report = space.revoke("busy", PAGE, PAGE)
            assert [(c.client, c.outcome) for c in report.clients] == [("busy", "acked")]
            space.grant("busy", PAGE, PAGE)
        read = _metric(d, worker)
        walked = _metric(d, loop)
        report = space.revoke("busy", PAGE, PAGE)  # within the 1 s pause: from the text
        assert [(c.client, c.outcome) for c in report.clients] == [("busy", "acked")]
        space.grant("busy", PAGE, PAGE)
        assert (_metric(d, worker), _metric(d, loop)) == (read + 1, walked)
        busy.ok("release_mmap_lock")
        time.sleep(1.1)  # the first pause is 1 s
        assert space.revoke("busy", PAGE, PAGE).all_acked
        assert _metric(d, loop) == walked + 1
        assert owner.stats().fenced_total == 0


def test_what_the_journal_adds_to_each_change_is_measured(quiet):
    """membroker_journal_wait_seconds{change}: one observation for each change that wrote the
    journal, by its kind, of how long its call waited for the commit once the change itself
    was carried out (the owner's revoke reads its own cost there: issue 9's "same daemon")."""
    d, start = quiet

    def count(change: str) -> float:
        return _metric(d, f'membroker_journal_wait_seconds_count{{change="{change}"}}')

    def total(change: str) -> float:
        return _metric(d, f'membroker_journal_wait_seconds_sum{{change="{change}"}}')

    before = {c: count(c) for c in ("share", "grant_rw", "grant_ro", "revoke", "private")}
    with membroker.connect("vmm", d.runtime_dir) as owner:
        space = owner.create_space(MiB)
        space.share(0, MiB)
        space.grant("backend", 0, 4 * PAGE)
        space.grant("backend", 4 * PAGE, PAGE, "ro")
        backend = start("backend")
        backend.ok("attach_va", space=space.space_id)
        for _ in range(3):
            assert space.revoke("backend", PAGE, PAGE).all_acked
            space.grant("backend", PAGE, PAGE)
        assert space.unshare(8 * PAGE, PAGE).all_acked
    after = {c: count(c) for c in before}
    assert {c: after[c] - before[c] for c in before} == {
        "share": 1,
        "grant_rw": 4,
        "grant_ro": 1,
        "revoke": 3,
        "private": 1,
    }
    assert 0 < total("revoke") < 3 * 1.0  # three waits, each well under the deadline
