"""PID namespaces: what SO_PEERPIDFD and our fdinfo say about a peer, and the refusal's words.

The real cases use `unshare --pid --fork --mount-proc` (root): a listener in a PID namespace of
its own sees a peer of ours as pid 0 (another namespace, alive) and then -1 (exited); a peer in
a namespace nested inside ours is visible, with its pid.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from membroker._sys import peer_pidfd
from membroker._sys.pidfd_peer import (
    PidfdView,
    own_pid_namespace,
    parse_pidfd_fdinfo,
    pidfd_pid_namespace,
    pidfd_view,
)
from membrokerd.pidns import (
    FIXES,
    PeerPlace,
    describe_invisible_peer,
    describe_uninspectable,
    inspect_refusal,
    place_of,
)

ENOENT = OSError(errno.ENOENT, os.strerror(errno.ENOENT))

# -- pure ---------------------------------------------------------------------------------------


def test_parse_fdinfo_of_a_pidfd() -> None:
    text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1234\nPid:\t4242\nNSpid:\t4242\t17\t1\n"
    assert parse_pidfd_fdinfo(text) == (4242, (4242, 17, 1))
    assert parse_pidfd_fdinfo("pos:\t0\nPid:\t0\nNSpid:\t0\n") == (0, (0,))
    assert parse_pidfd_fdinfo("pos:\t0\nPid:\t-1\nNSpid:\t-1\n") == (-1, (-1,))
    assert parse_pidfd_fdinfo("pos:\t0\nflags:\t02\n") == (None, ())  # not a pidfd
    assert parse_pidfd_fdinfo("Pid:\tgarbage\n") == (None, ())


@pytest.mark.parametrize(
    ("view", "cred_pid", "place"),
    [
        (PidfdView(123, (123,)), 123, PeerPlace.VISIBLE),
        (PidfdView(123, (123, 1)), 123, PeerPlace.VISIBLE),  # nested inside ours: visible
        (PidfdView(0, (0,), "pid:[4026531836]"), 0, PeerPlace.OTHER_NAMESPACE),
        (PidfdView(-1, (-1,)), 0, PeerPlace.EXITED),
        (PidfdView(-1, (-1,)), 77, PeerPlace.EXITED),
        (None, 0, PeerPlace.OTHER_NAMESPACE),  # no pidfd: SO_PEERCRED's 0 says it all
        (PidfdView(None), 0, PeerPlace.OTHER_NAMESPACE),
        (None, 77, PeerPlace.UNKNOWN),
    ],
)
def test_place_of(view: PidfdView | None, cred_pid: int, place: PeerPlace) -> None:
    assert place_of(view, cred_pid) is place


def test_the_refusal_names_the_problem_and_both_fixes() -> None:
    text = describe_invisible_peer("pid:[4026531836]", "pid:[4026532251]")
    assert "another PID namespace" in text
    assert "pid:[4026531836]; the daemon's is pid:[4026532251]" in text
    assert "SO_PEERCRED pid 0" in text and "/proc" in text
    for fix in ("shareProcessNamespace: true", "--pid=container:", "hostPID: true", "--pid=host"):
        assert fix in text and fix in FIXES
    assert "verify = off" in text
    # Whatever the kernel could not say, the message still stands.
    assert "another PID namespace (the daemon's is pid:[1])" in describe_invisible_peer(
        None, "pid:[1]"
    )
    assert "another PID namespace (not the daemon's)" in describe_invisible_peer(None, None)


def test_refusal_without_a_pidfd() -> None:
    assert "another PID namespace" in inspect_refusal(-1, 0, ENOENT)
    assert "exited during the handshake" in inspect_refusal(-1, 77, ENOENT)
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES))
    assert inspect_refusal(-1, 77, denied) == describe_uninspectable(77, denied)
    assert "CAP_SYS_PTRACE" in describe_uninspectable(77, denied)


# -- real pidfds ---------------------------------------------------------------------------------


def test_own_pidfd_is_visible_and_names_our_namespace() -> None:
    fd = os.pidfd_open(os.getpid())
    try:
        view = pidfd_view(fd)
        assert view.pid == os.getpid() and view.nspid[0] == os.getpid()
        assert view.pid_namespace is None or view.pid_namespace == own_pid_namespace()
        assert place_of(view, os.getpid()) is PeerPlace.VISIBLE
        # A visible process whose /proc cannot be opened: the old message, unchanged.
        denied = OSError(errno.EACCES, os.strerror(errno.EACCES))
        assert inspect_refusal(fd, os.getpid(), denied) == describe_uninspectable(
            os.getpid(), denied
        )
    finally:
        os.close(fd)


def test_exited_child_reads_minus_one() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    fd = os.pidfd_open(child.pid)
    try:
        child.wait(10)
        view = pidfd_view(fd)
        assert view.pid == -1
        assert pidfd_pid_namespace(fd) is None  # ESRCH once gone
        assert place_of(view, child.pid) is PeerPlace.EXITED
        assert "exited during the handshake" in inspect_refusal(fd, child.pid, ENOENT)
    finally:
        os.close(fd)


def test_not_a_pidfd() -> None:
    r, w = os.pipe()
    try:
        assert pidfd_view(r).pid is None
    finally:
        os.close(r)
        os.close(w)


def _need_unshare() -> str:
    if os.geteuid() != 0:
        pytest.skip("needs root: unshare --pid --mount-proc")
    path = shutil.which("unshare")
    if path is None:
        pytest.skip("unshare is not installed (util-linux)")
    return path


# Runs as pid 1 of a new PID namespace with its own /proc: accepts one connection (from the
# test process, outside its namespace), reports what it sees while the peer lives, then again
# once the peer has said it is about to exit and has exited.
_LISTENER = textwrap.dedent(
    """
    import errno, json, os, socket, sys, time
    from membroker._sys import peer_credentials, peer_pidfd, pidfd_send_signal
    from membroker._sys.pidfd_peer import own_pid_namespace, pidfd_view
    from membrokerd.pidns import inspect_refusal, place_of
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(sys.argv[1])
    srv.listen()
    print("ready", flush=True)
    conn, _ = srv.accept()
    cred = peer_credentials(conn)
    fd = peer_pidfd(conn)
    view = pidfd_view(fd)
    enoent = OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    out = {
        "cred_pid": cred.pid,
        "pid": view.pid,
        "nspid": list(view.nspid),
        "peer_ns": view.pid_namespace,
        "own_ns": own_pid_namespace(),
        "place": place_of(view, cred.pid).value,
        "refusal": inspect_refusal(fd, cred.pid, enoent),
    }
    try:
        pidfd_send_signal(fd, 0)  # not even signal 0 crosses into a namespace outside ours
        out["signal"] = 0
    except OSError as exc:
        out["signal"] = exc.errno
    conn.recv(1)  # the peer's process is gone once its socket closed and it was reaped
    for _ in range(100):
        view = pidfd_view(fd)
        if view.pid == -1:
            break
        time.sleep(0.02)
    out["pid_after_exit"] = view.pid
    out["place_after_exit"] = place_of(view, cred.pid).value
    print(json.dumps(out), flush=True)
    """
)


def test_peer_outside_our_pid_namespace(tmp_path: Path) -> None:
    """The broker-in-a-container case: its peer is not in its namespace (pid 0, alive)."""
    unshare = _need_unshare()
    sock_path = tmp_path / "s.sock"
    listener = subprocess.Popen(
        [
            unshare,
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            sys.executable,
            "-c",
            _LISTENER,
            sock_path,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        line = listener.stdout.readline()
        if line.strip() != "ready":
            listener.wait(10)
            assert listener.stderr is not None
            err = listener.stderr.read()
            if "Operation not permitted" in err:
                pytest.skip(f"cannot make a PID namespace here: {err.strip()}")
            raise AssertionError(f"listener failed: {line}{err}")
        # The peer: a short-lived child of ours (not the test process itself, so that it can
        # exit while the listener watches).
        peer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import socket, sys, time; s = socket.socket(socket.AF_UNIX); "
                "s.connect(sys.argv[1]); time.sleep(0.5)",
                sock_path,
            ]
        )
        peer.wait(20)
        out, err = listener.communicate(timeout=20)
        assert listener.returncode == 0, err
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait(10)
    seen = json.loads(out)
    assert seen["cred_pid"] == 0
    assert seen["pid"] == 0 and seen["nspid"] == [0]
    assert seen["place"] == "other_namespace"
    assert seen["own_ns"] != own_pid_namespace()
    if seen["peer_ns"] is not None:  # PIDFD_GET_PID_NAMESPACE: Linux 6.11+
        assert seen["peer_ns"] == own_pid_namespace()
    assert seen["refusal"] == describe_invisible_peer(seen["peer_ns"], seen["own_ns"])
    assert seen["signal"] == errno.EINVAL  # fencing could not kill it either
    assert seen["pid_after_exit"] == -1 and seen["place_after_exit"] == "exited"


def test_peer_in_a_nested_pid_namespace_is_visible(tmp_path: Path) -> None:
    """The hostPID case: a peer in a namespace nested inside ours has a pid here."""
    unshare = _need_unshare()
    srv = socket.socket(socket.AF_UNIX)
    with srv:
        srv.bind(str(tmp_path / "s.sock"))
        srv.listen()
        peer = subprocess.Popen(
            [
                unshare,
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                sys.executable,
                "-c",
                "import os, socket, sys; s = socket.socket(socket.AF_UNIX); "
                "s.connect(sys.argv[1]); print(os.getpid(), flush=True); s.recv(1)",
                str(tmp_path / "s.sock"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            srv.settimeout(20)
            conn, _ = srv.accept()
            with conn:
                fd = peer_pidfd(conn)
                try:
                    view = pidfd_view(fd)
                    assert view.pid is not None and view.pid > 0
                    assert len(view.nspid) == 2 and view.nspid[0] == view.pid
                    assert place_of(view, view.pid) is PeerPlace.VISIBLE
                    assert peer.stdout is not None
                    assert int(peer.stdout.readline()) == view.nspid[1]  # its own pid there
                    if view.pid_namespace is not None:
                        assert view.pid_namespace != own_pid_namespace()
                finally:
                    os.close(fd)
        finally:
            deadline = time.monotonic() + 10
            while peer.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if peer.poll() is None:
                peer.kill()
            peer.wait(10)
