"""Identity and limits: socket modes, uid/gid policy, quotas; refusals name the rule."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import membroker
from tests.conftest import Daemon, _env

NOBODY = 65534
MiB = 1 << 20
AS_USER = Path(__file__).with_name("as_user.py")


def as_nobody(d: Daemon, name: str, scenario: str, *extra: str) -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            str(AS_USER),
            "--runtime-dir",
            str(d.runtime_dir),
            "--uid",
            str(NOBODY),
            "--gid",
            str(NOBODY),
            "--name",
            name,
            scenario,
            *extra,
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    assert result["uid"] == NOBODY
    return result


def daemon_with(tmp_path: Path, **settings: str) -> Daemon:
    env = dict(_env(), **{f"MEMBROKER_{k.upper()}": v for k, v in settings.items()})
    # pytest's tmp_path is under a 0700 directory; other users must at least reach the sockets.
    top = Path(tempfile.mkdtemp(prefix="membroker-id-"))
    top.chmod(0o755)
    return Daemon(top / "rt", env=env)


def stop_and_clean(d: Daemon) -> None:
    rc = d.stop()
    shutil.rmtree(d.runtime_dir.parent)
    assert rc == 0


def test_sockets_are_not_open_to_other_users_by_default(tmp_path):
    d = daemon_with(tmp_path)
    try:
        for sock in ("control.sock", "session.sock"):
            assert (d.runtime_dir / sock).stat().st_mode & 0o777 == 0o660
        result = as_nobody(d, "guest", "connect")
        assert result["error"] == "ConnectError"
        assert "Permission denied" in str(result["message"])
    finally:
        stop_and_clean(d)


def test_policy_by_uid_refuses_names_ownership_and_attachment(tmp_path):
    d = daemon_with(
        tmp_path,
        SESSION_SOCKET_MODE="0666",
        CONTROL_SOCKET_MODE="0666",
        CLIENT_NAMES='{"backend": [0]}',
        OWNER_UIDS="[0]",
        ATTACH_UIDS="[0]",
    )
    try:
        refused = as_nobody(d, "backend", "connect")
        assert refused["error"] == "ConnectError"
        assert "client name 'backend' is reserved for uid(s) [0] (client_names)" in str(
            refused["message"]
        )
        assert as_nobody(d, "guest", "connect")["ok"] is True

        owner_refused = as_nobody(d, "guest", "create")
        assert owner_refused["error"] == "PermissionDenied"
        assert f"(uid {NOBODY}, gid {NOBODY}) may not own spaces (owner_uids = [0]" in str(
            owner_refused["message"]
        )

        with membroker.connect("vmm", d.runtime_dir) as owner:
            space = owner.create_space(MiB)
            space.share(0, MiB)
            space.grant("guest", 0, MiB)
            attach_refused = as_nobody(d, "guest", "attach", space.space_id)
            assert attach_refused["error"] == "PermissionDenied"
            assert "may not attach to spaces (attach_uids = [0]" in str(attach_refused["message"])
            assert owner.get_space(space.space_id).attachments == 0
            assert [s.client for s in owner.list_sessions()] == ["vmm"]
    finally:
        stop_and_clean(d)


def test_pins_per_session_are_limited(tmp_path):
    """A client that pins without end would make every revocation look at every pin: the
    pin past max_pins_per_session is refused, naming the limit, and changes nothing."""
    d = daemon_with(tmp_path, MAX_PINS_PER_SESSION="2")
    try:
        with (
            membroker.connect("vmm", d.runtime_dir) as owner,
            membroker.connect("dma", d.runtime_dir) as dma_session,
        ):
            space = owner.create_space(MiB)
            space.share(0, MiB)
            space.grant("dma", 0, MiB)
            dma = dma_session.attach_fd(space.space_id)
            first = dma.pin(0, 4096)
            dma.pin(0, 4096)  # the same range again is a pin of its own
            with pytest.raises(
                membroker.ResourceExhausted,
                match=r"this session holds 2 pins on sp-\w+ \(limit max_pins_per_session = 2\)",
            ):
                dma.pin(8192, 4096)
            first.unpin()
            dma.pin(8192, 4096)  # room again
            with pytest.raises(membroker.ResourceExhausted, match="max_pins_per_session"):
                dma.pin(0, 4096)
    finally:
        stop_and_clean(d)


def test_client_names_per_uid_are_limited(tmp_path):
    """Every new name a uid uses is bound to it for good: a uid looping fresh names is refused
    past max_client_names_per_uid, and its names already bound still work."""
    d = daemon_with(tmp_path, MAX_CLIENT_NAMES_PER_UID="3")
    try:
        for name in ("a", "b", "c"):
            membroker.connect(name, d.runtime_dir).close()
        with pytest.raises(
            membroker.ConnectError,
            match=r"uid 0 has used 3 client names; 'd' would be one more "
            r"\(limit max_client_names_per_uid = 3\)",
        ):
            membroker.connect("d", d.runtime_dir)
        membroker.connect("a", d.runtime_dir).close()  # a name it holds: fine
    finally:
        stop_and_clean(d)


def test_quotas_refuse_with_resource_exhausted_naming_the_limit(tmp_path):
    d = daemon_with(
        tmp_path,
        MAX_SPACES_PER_OWNER="2",
        MAX_BYTES_PER_OWNER=str(3 * MiB),
        MAX_GRANT_FRAGMENTS_PER_CLIENT="6",
        MAX_SESSIONS_PER_UID="3",
    )
    try:
        with membroker.connect("vmm", d.runtime_dir) as owner:
            a = owner.create_space(2 * MiB)
            with pytest.raises(
                membroker.ResourceExhausted,
                match=r"'vmm' owns 2097152 bytes and asks for 2097152 more "
                r"\(limit max_bytes_per_owner = 3145728\)",
            ):
                owner.create_space(2 * MiB)
            owner.create_space(MiB).close()
            with pytest.raises(
                membroker.ResourceExhausted,
                match=r"'vmm' owns 2 spaces \(limit max_spaces_per_owner = 2\)",
            ):
                owner.create_space(4096)
            a.share(0, 2 * MiB)
            for page in range(3):  # three separate rw ranges: 6 stored ranges
                a.grant("backend", page * 8192, 4096)
            with pytest.raises(
                membroker.ResourceExhausted, match="limit max_grant_fragments_per_client = 6"
            ):
                a.grant("backend", 6 * 8192, 4096)
            assert len(a.grants("backend")) == 3
            with (
                membroker.connect("s2", d.runtime_dir),
                membroker.connect("s3", d.runtime_dir),
                pytest.raises(
                    membroker.ConnectError,
                    match=r"too many sessions of uid 0 \(limit max_sessions_per_uid = 3\)",
                ),
            ):
                membroker.connect("s4", d.runtime_dir)
            a.close()
    finally:
        stop_and_clean(d)


class Holder:
    """A session held open by a process of another uid, until `end()` (by its pid)."""

    def __init__(self, d: Daemon, uid: int, name: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(AS_USER),
                "--runtime-dir",
                str(d.runtime_dir),
                "--uid",
                str(uid),
                "--gid",
                str(uid),
                "--name",
                name,
                "hold",
            ],
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.result: dict[str, object] = json.loads(self.proc.stdout.readline())
        assert self.result["uid"] == uid

    def end(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self.proc.stdout.close()


def test_many_uids_at_their_own_limits_fill_max_sessions_and_are_refused_by_name(tmp_path):
    """README, "Many uids together": each uid stops at max_sessions_per_uid, but two uids at
    their limit fill a max_sessions of 4; then every new session (root's too) is refused naming
    max_sessions, and once one ends a new one is let in."""
    d = daemon_with(
        tmp_path,
        SESSION_SOCKET_MODE="0666",
        CONTROL_SOCKET_MODE="0666",
        MAX_SESSIONS="4",
        MAX_SESSIONS_PER_UID="2",
    )
    holders: list[Holder] = []
    try:
        for uid in (NOBODY, NOBODY - 1):
            for i in range(2):
                holder = Holder(d, uid, f"u{uid}-{i}")
                holders.append(holder)
                assert holder.result["ok"] is True, holder.result
            if uid == NOBODY:
                # A third session of a uid at its limit is refused by its own limit...
                over = as_nobody(d, "u-third", "connect")
                assert over["error"] == "ConnectError"
                assert f"too many sessions of uid {NOBODY} (limit max_sessions_per_uid = 2)" in str(
                    over["message"]
                ), over
        assert len({h.result["session"] for h in holders}) == 4
        # ... and anyone else's, root's included, by the global one, which the uids filled.
        with pytest.raises(
            membroker.ConnectError, match=r"too many sessions \(limit max_sessions = 4\)"
        ):
            membroker.connect("root-late", d.runtime_dir, timeout=10)
        holders.pop().end()  # one ends: room for one, once the broker has seen it go
        deadline = time.monotonic() + 10
        while True:
            try:
                late = membroker.connect("root-late", d.runtime_dir, timeout=10)
                break
            except membroker.ConnectError as exc:
                if "limit max_sessions = 4" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with late:
            assert late.session_id not in {h.result["session"] for h in holders}
    finally:
        for holder in holders:
            holder.end()
        stop_and_clean(d)
