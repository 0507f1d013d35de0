"""Sessions resume across a restart or a live upgrade of the daemon (issue 10, items 2 and 3).

A plain daemon (no systemd here; tests/deploy/test_restart.py does the same under a real
manager): `membrokerctl upgrade` / SIGUSR2 re-executes it in place, handing its sockets, space
fds and journal over; `kill -9` and a new daemon on the same directories loses the spaces (no
fd store outside systemd) but not the sessions' resume tokens. Real client processes
(resume_client.py) hold a cooperative VaClient and do nothing but answer: whatever resumes,
resumes by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import membroker
from membroker import wire
from membroker.errors import BrokerRestarting
from membroker.v1 import session_pb2 as spb
from tests.conftest import Daemon, PeerProc, _env, stop_process, wait_for

MiB = 1 << 20
PAGE = 4096
RESUME_CLIENT = Path(__file__).with_name("resume_client.py")
NOBODY = 65534
T = TypeVar("T")


def _retrying(call: Callable[[], T], timeout: float = 30) -> tuple[T, int]:
    """`call()` once the broker is back: (its result, how many BrokerRestarting it met)."""
    deadline = time.monotonic() + timeout
    met = 0
    while True:
        try:
            return call(), met
        except BrokerRestarting as exc:
            assert exc.retryable
            met += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _ctl(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "membroker.ctl", "--runtime-dir", str(d.runtime_dir), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _settled_fds(pid: int) -> int:
    """The daemon's fd count once it stays the same for 0.3 s."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        n = len(os.listdir(f"/proc/{pid}/fd"))
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since > 0.3:
            return n
        time.sleep(0.05)
    return last


def _hello(runtime_dir: Path, name: str, token: str) -> spb.Frame:
    """A raw Hello with a resume token from this process; the broker's first answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(runtime_dir / "session.sock"))
        s.sendall(
            wire.encode(
                spb.Frame(
                    hello=spb.Hello(
                        protocol_version=wire.PROTOCOL_VERSION,
                        client_name=name,
                        resume_token=token,
                    )
                )
            )
        )
        decoder = wire.FrameDecoder()
        try:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
                frames = decoder.feed(chunk, [])
                if frames:
                    return frames[0][0]
        finally:
            decoder.close()
    raise AssertionError("no answer to the Hello")


def _steal(runtime_dir: Path, name: str, token: str, uid: int = -1) -> dict[str, Any]:
    """The same Hello from another process (and, with `uid`, another user)."""
    out = subprocess.run(
        [
            sys.executable,
            str(RESUME_CLIENT),
            "--runtime-dir",
            str(runtime_dir),
            "--name",
            name,
            f"--steal={token}",  # a token may start with "-"
            "--uid",
            str(uid),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@contextlib.contextmanager
def _guest(tmp_path: Path, mode: str) -> Iterator[tuple[Daemon, membroker.Session, Any, bytes]]:
    """A daemon, an owner session 'vmm' in this process with a 4 MiB space (bytes written,
    shared, 2 MiB granted rw to 'backend'), and a client process 'backend' attached to it as
    a VaClient in `mode`."""
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "3000")
    owner = None
    client = None
    try:
        owner = membroker.connect("vmm", str(d.runtime_dir))
        space = owner.create_space(4 * MiB, name="guest")
        data = random.Random(3).randbytes(64 * 1024)
        assert space.fd is not None
        os.pwrite(space.fd, data, 0)
        space.close()
        space.share(0, 4 * MiB)
        space.grant("backend", 0, 2 * MiB, "rw")
        client = PeerProc(RESUME_CLIENT, d.runtime_dir, "backend")
        assert client.ok("attach_va", space=space.space_id, mode=mode)["mode"] == mode
        assert client.ok("read", offset=0, length=64)["data"] == data[:64].hex()
        yield d, owner, client, data
    finally:
        if client is not None:
            if client.proc.poll() is None:
                os.kill(client.pid, signal.SIGCONT)
            client.close()
        if owner is not None:
            owner.close()
        rc = d.stop()
        assert rc == (-signal.SIGKILL if getattr(d, "killed", False) else 0), d.log()


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[tuple[Daemon, membroker.Session, Any, bytes]]:
    with _guest(tmp_path, "cooperative") as found:
        yield found


def _space_of(owner: membroker.Session) -> membroker.OwnedSpace:
    [info] = _retrying(owner.list_spaces)[0]
    return owner.space(info.space_id)


def test_upgrade_in_place_resumes_a_va_client_that_keeps_reading(guest: Any) -> None:
    d, owner, client, data = guest
    space = _space_of(owner)
    before = _settled_fds(d.pid)

    done = _ctl(d, "upgrade")
    assert done.returncode == 0, done.stderr + d.log()
    assert f"membrokerd {d.pid} upgraded in place" in done.stdout
    assert d.proc.poll() is None  # the same process, re-executed
    assert "upgrade: this process took over 3 fd(s)" in d.log()  # 2 sockets, 1 space

    # The client resumes and re-binds its attachment without doing anything; its old
    # mapping never stopped working.
    wait_for("the client to resume", lambda: client.ok("status")["resumed"] == 1)
    status = client.ok("status")
    assert status["resumes"] == 1 and status["dropped"] is None and status["closed"] is None
    assert status["ranges"] == [[0, 2 * MiB, "RW"]]
    assert client.ok("read", offset=0, length=len(data))["data"] == data.hex()
    # So does the owner: its handle works again (a call in the gap met BrokerRestarting).
    _retrying(lambda: space.grant("backend", 2 * MiB, MiB, "ro"))
    assert owner.resumes == 1

    # Verification resumed for the client: a revoke is acknowledged and verified.
    report = space.revoke("backend", 0, 64 * 1024)
    assert [(c.client, c.outcome) for c in report.clients] == [("backend", "acked")]
    assert client.ok("holds", offset=0, length=PAGE)["holds"] is False
    assert client.ok("holds", offset=2 * MiB, length=MiB)["holds"] is True
    # The re-synchronisation at the resume is reported like a revocation.
    resync = [r for r in space.revocations() if r.cause == "resume"]
    assert [(c.client, c.outcome) for r in resync for c in r.clients] == [("backend", "acked")]

    # No fd leaks: after the upgrade the daemon has one fd more than before, the control
    # socket it relays to gRPC (gRPC cannot adopt a socket); a second upgrade adds nothing.
    after = _settled_fds(d.pid)
    assert after == before + 1, (before, after)
    done = _ctl(d, "upgrade")
    assert done.returncode == 0, done.stderr + d.log()
    wait_for("the second resume", lambda: client.ok("status")["resumed"] == 2)
    _retrying(owner.list_spaces)
    assert _settled_fds(d.pid) == after
    assert client.ok("read", offset=2 * MiB, length=16)["data"] == "00" * 16


def test_revocation_reports_survive_an_upgrade(guest: Any) -> None:
    """The journal keeps each space's newest revocation reports: after an upgrade in place,
    ListRevocations still answers with the ones of before, as they were."""
    d, owner, client, _ = guest
    space = _space_of(owner)
    report = space.revoke("backend", 0, 64 * 1024)
    assert [(c.client, c.outcome) for c in report.clients] == [("backend", "acked")]

    def summary(reports: list[Any]) -> list[tuple[Any, ...]]:
        return [
            (
                r.seq,
                r.cause,
                r.revoked_bytes,
                r.caller_gone,
                [(c.client, c.session_id, c.pid, c.outcome, c.fence, c.reason) for c in r.clients],
            )
            for r in reports
        ]

    before = summary(space.revocations())
    assert before and before[-1][0] == report.seq
    done = _ctl(d, "upgrade")
    assert done.returncode == 0, done.stderr + d.log()
    wait_for("the client to resume", lambda: client.ok("status")["resumed"] == 1)
    after, _ = _retrying(space.revocations)
    assert summary(after[: len(before)]) == before
    # The resume's own re-synchronisation follows them (at the same seq: nothing changed).
    assert [(r.seq, r.cause) for r in after[len(before) :]] == [(report.seq, "resume")]


def test_a_range_revoked_while_the_client_was_away_is_torn_down_at_its_resume(
    guest: Any,
) -> None:
    """The client is frozen across the upgrade; meanwhile the owner revokes half of its grant
    (nobody is attached to tell). When it resumes, the broker re-synchronises it: the client
    tears the range down, acknowledges, and is verified."""
    d, owner, client, _ = guest
    space = _space_of(owner)
    stop_process(client.pid)
    os.kill(d.pid, signal.SIGUSR2)
    report, _ = _retrying(lambda: space.revoke("backend", 0, MiB))
    assert report.clients == ()  # nobody attached: nobody to wait for
    os.kill(client.pid, signal.SIGCONT)
    wait_for("the client to resume", lambda: client.ok("status")["resumed"] == 1)
    assert client.ok("holds", offset=0, length=PAGE)["holds"] is False
    assert client.ok("holds", offset=MiB, length=MiB)["holds"] is True
    refused = client.cmd("read", offset=0, length=16)
    assert refused["error"] == "NotHeld", refused
    assert client.ok("read", offset=MiB, length=16)["data"] == "00" * 16
    resync = [r for r in space.revocations() if r.cause == "resume"]
    assert [(c.client, c.outcome) for r in resync for c in r.clients] == [("backend", "acked")]


def test_kill_9_owner_calls_fail_retryably_and_an_unreconcilable_client_drops(
    guest: Any,
) -> None:
    """Outside systemd no space survives the process: after kill -9 and a new daemon, the
    sessions resume (their tokens are in the journal), but the space is gone, so the client
    cannot be reconciled: it is told (the re-bind is refused) and drops its mapping."""
    d, owner, client, _ = guest
    space = _space_of(owner)
    # A call in flight at the crash: a revoke waiting for the (frozen) client's ack.
    stop_process(client.pid)
    in_flight: list[BaseException] = []

    def revoke() -> None:
        try:
            space.revoke("backend", 0, PAGE)
        except BaseException as exc:
            in_flight.append(exc)

    waiter = threading.Thread(target=revoke)
    waiter.start()
    wait_for("the revoke to be in flight", lambda: bool(owner._results))
    os.kill(d.pid, signal.SIGKILL)
    d.killed = True  # type: ignore[attr-defined]
    assert d.proc.wait(10) == -signal.SIGKILL
    waiter.join(30)
    assert not waiter.is_alive()
    assert [type(e) for e in in_flight] == [BrokerRestarting], in_flight
    # The broker is gone: a new call fails at once with the typed, retryable error too.
    with pytest.raises(BrokerRestarting) as caught:
        space.grant("backend", 2 * MiB, PAGE, "ro")
    assert caught.value.retryable
    assert not owner.closed
    os.kill(client.pid, signal.SIGCONT)

    again = Daemon(d.runtime_dir, "--revoke-deadline-ms", "3000")
    try:
        spaces, _ = _retrying(owner.list_spaces)
        assert spaces == [] and owner.resumes == 1
        wait_for("the client to resume", lambda: client.ok("status")["resumes"] == 1)
        wait_for("the client to drop", lambda: client.ok("status")["dropped"] is not None)
        status = client.ok("status")
        assert f"no space {space.space_id!r}" in status["dropped"], status
        assert status["ranges"] == [] and status["closed"] is None
        assert client.ok("holds", offset=0, length=PAGE)["holds"] is False
        assert client.ok("perms", offset=0)["perms"] == ""  # unmapped
        assert "(resumed)" in again.log()
    finally:
        assert again.stop() == 0, again.log()


def test_a_resume_token_works_only_for_its_own_process_name_and_uid() -> None:
    """Think like a thief: a forged token, the real token from another process of the same
    uid, from another uid, or under another name are refused (and change nothing: the
    rightful process resumes afterwards)."""
    top = Path(tempfile.mkdtemp(prefix="membroker-resume-"))
    top.chmod(0o755)  # other users must reach the socket
    env = dict(_env(), MEMBROKER_SESSION_SOCKET_MODE="0666")
    d = Daemon(top / "rt", env=env)
    try:
        victim = membroker.Session("victim", str(d.runtime_dir), resume=0)
        token = victim.resume_token
        assert token
        os.kill(d.pid, signal.SIGUSR2)
        wait_for("the session to end", lambda: victim.closed)
        victim.close()
        with membroker.connect("probe", str(d.runtime_dir)):  # the new process serves
            pass

        forged = _steal(d.runtime_dir, "victim", "A" * len(token))
        assert (forged["kind"], forged["code"]) == ("error", 5), forged
        assert "resume token is unknown or expired" in forged["message"]
        other_process = _steal(d.runtime_dir, "victim", token)
        assert (other_process["kind"], other_process["code"]) == ("error", 7), other_process
        assert "it was issued to another process" in other_process["message"]
        other_uid = _steal(d.runtime_dir, "victim", token, uid=NOBODY)
        assert (other_uid["kind"], other_uid["code"]) == ("error", 7), other_uid
        assert f"it was issued to uid 0, not {NOBODY}" in other_uid["message"]
        other_name = _hello(d.runtime_dir, "thief", token)
        assert other_name.WhichOneof("body") == "error", other_name
        assert "issued to client name 'victim', not 'thief'" in other_name.error.message
        bad = _hello(d.runtime_dir, "victim", "x" * 1000)
        assert bad.WhichOneof("body") == "error" and bad.error.code == 5, bad

        # Nothing was consumed: this very process, under its name, resumes.
        welcome = _hello(d.runtime_dir, "victim", token)
        assert welcome.WhichOneof("body") == "welcome", welcome
        assert welcome.welcome.resumed and welcome.welcome.resume_token not in ("", token)
        # Used once: the old token is gone.
        again = _hello(d.runtime_dir, "victim", token)
        assert again.WhichOneof("body") == "error" and again.error.code == 5, again
        assert "refused for pid" in d.log()
    finally:
        rc = d.stop()
        log = d.log()
        shutil.rmtree(top, ignore_errors=True)
        assert rc == 0, log


def test_upgrade_is_for_root_or_the_daemons_uid_only_and_ctl_help_says_so(
    tmp_path: Path,
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "membroker.ctl", "upgrade", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "SIGUSR2" in out.stdout and "same pid" in out.stdout
    top = Path(tempfile.mkdtemp(prefix="membroker-upgrade-"))
    top.chmod(0o755)
    env = dict(_env(), MEMBROKER_SESSION_SOCKET_MODE="0666", MEMBROKER_CONTROL_SOCKET_MODE="0666")
    d = Daemon(top / "rt", env=env)
    try:
        script = (
            "import os, sys, json\n"
            "import membroker\n"
            "from membroker.v1 import broker_pb2 as pb\n"
            f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
            "s = membroker.Session('nobody', sys.argv[1], resume=0)\n"
            "try:\n"
            "    s.call('Upgrade', pb.UpgradeRequest())\n"
            "    print('upgraded')\n"
            "except membroker.PermissionDenied as exc:\n"
            "    print(exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script, str(d.runtime_dir)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "only root or the daemon's uid 0 may upgrade it" in out.stdout, out.stdout
        assert "upgrading" not in d.log()
    finally:
        rc = d.stop()
        log = d.log()
        shutil.rmtree(top, ignore_errors=True)
        assert rc == 0, log


def test_a_sealed_va_client_resumes_with_a_new_userfaultfd(tmp_path: Path) -> None:
    """A sealed mapping's userfaultfd ends with the daemon that held it: at the resume the
    client zaps its pages and hands the new daemon a new one, which checks and registers the
    mapping like a new one, then re-synchronises it (here: a range revoked while the client
    was frozen across the upgrade is gone from it)."""
    from membroker.clients import sealed_mode_available

    if not sealed_mode_available():
        pytest.skip("this kernel or process cannot use sealed VA mode")
    with _guest(tmp_path, "sealed") as (d, owner, client, _):
        space = _space_of(owner)
        stop_process(client.pid)
        os.kill(d.pid, signal.SIGUSR2)
        report, _ = _retrying(lambda: space.revoke("backend", 0, MiB))
        assert report.clients == ()
        os.kill(client.pid, signal.SIGCONT)
        wait_for("the client to resume", lambda: client.ok("status")["resumed"] == 1)
        wait_for(
            "the re-synchronisation",
            lambda: client.ok("holds", offset=0, length=PAGE)["holds"] is False,
        )
        status = client.ok("status")
        assert status["dropped"] is None and status["ranges"] == [[MiB, MiB, "RW"]], status
        # Its old mapping reads again: the new daemon faults the held pages in.
        assert client.ok("read", offset=MiB, length=16)["data"] == "00" * 16
        resync = [r for r in space.revocations() if r.cause == "resume"]
        assert [(c.client, c.outcome) for r in resync for c in r.clients] == [("backend", "acked")]
        sessions = owner.list_sessions()
        assert [s.sealed_spaces for s in sessions if s.client == "backend"] == [[space.space_id]]
        # A revoke after the resume is enforced and verified.
        report = space.revoke("backend", MiB, PAGE)
        assert [(c.client, c.outcome) for c in report.clients] == [("backend", "acked")]
        assert client.ok("holds", offset=MiB, length=PAGE)["holds"] is False
        assert client.ok("read", offset=MiB + PAGE, length=16)["data"] == "00" * 16


def test_an_fd_client_keeps_its_fd_and_its_pins_end_with_the_old_daemon(guest: Any) -> None:
    d, owner, _, data = guest
    space = _space_of(owner)
    space.grant("vmm", 0, MiB, "rw")  # pins need a grant, even the owner's
    fdc = owner.attach_fd(space.space_id)
    try:
        pin = fdc.pin(0, PAGE)
        os.kill(d.pid, signal.SIGUSR2)
        wait_for("the fd client to resume", lambda: fdc.resumed == 1)
        assert fdc.dropped is None and fdc.pins == [] and pin.released
        pin.unpin()  # nothing to do: the broker that had it is gone
        assert os.pread(fdc.fd, len(data), 0) == data
        again = fdc.pin(0, PAGE)
        assert [p.pin_id for p in owner.list_pins(space.space_id)] == [again.pin_id]
        again.unpin()
    finally:
        fdc.close()


def test_a_client_that_does_not_resume_but_still_maps_is_killed_at_the_window_end(
    tmp_path: Path,
) -> None:
    """Nothing checks a mapping whose session is gone (a sealed one's userfaultfd ended with
    the old daemon). A process that does not resume within the window yet still maps a space
    is dealt with as a fenced client still mapping: killed (on_fenced_still_mapped = kill,
    the default). One that resumed is left alone."""
    env = dict(_env(), MEMBROKER_RESUME_WINDOW_S="1")
    d = Daemon(tmp_path / "rt", "--revoke-deadline-ms", "3000", env=env)
    procs: list[PeerProc] = []
    try:
        with membroker.connect("vmm", str(d.runtime_dir)) as owner:
            space = owner.create_space(4 * MiB)
            space.share(0, 4 * MiB)
            space.close()
            for name, extra in (("stayer", ()), ("leaver", ("--resume", "0"))):
                space.grant(name, 0, MiB, "ro")
                procs.append(PeerProc(RESUME_CLIENT, d.runtime_dir, name, *extra))
            stayer, leaver = procs
            stayer.ok("attach_va", space=space.space_id, mode="cooperative")
            # It keeps a mapping of its own and will not resume (its SDK would have unmapped
            # a VaClient's when its session ended).
            leaver.ok("attach_fd_and_map", space=space.space_id)
            os.kill(d.pid, signal.SIGUSR2)
            wait_for("the stayer to resume", lambda: stayer.ok("status")["resumed"] == 1)
            assert leaver.proc.wait(30) == -signal.SIGKILL
            assert stayer.proc.poll() is None
            log = d.log()
            assert "client 'leaver'" in log and "did not resume its session within 1 s" in log
            assert f"still maps {space.space_id}" in log and ": killed" in log
            _retrying(owner.list_spaces)
            assert owner.stats().fenced_total == 1
    finally:
        for proc in procs:
            proc.close()
        assert d.stop() == 0, d.log()
