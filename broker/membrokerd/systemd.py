"""The daemon's side of the systemd service protocols, with no library: notifications
(`READY=1`, `STATUS=`, `RELOADING=1`, `STOPPING=1`), a watchdog fed only while the event loop
really runs, sockets passed by socket activation (`LISTEN_FDS`), and the fds a daemon hands
the process it re-executes in a live upgrade (`handover_env`).

Everything here is inert outside systemd: without NOTIFY_SOCKET nothing is sent, without
WATCHDOG_USEC there is no watchdog, without LISTEN_FDS no socket is taken over.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import logging
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from membrokerd.listener import StartupRefused

if TYPE_CHECKING:
    from membrokerd.broker import Broker

log = logging.getLogger("membrokerd.systemd")

# sd_listen_fds(3): passed sockets start at this fd, in the order of the socket unit(s).
LISTEN_FDS_START = 3


def notify(*fields: str, fds: Sequence[int] = ()) -> bool:
    """Sends `fields` (like "READY=1", "STATUS=...") to the manager as one datagram, when
    started with Type=notify (NOTIFY_SOCKET set), with `fds` attached (SCM_RIGHTS: what
    FDSTORE=1 stores). True if it was sent."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not fields:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket
    message = "\n".join(fields).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            if fds:
                rights = array.array("i", fds).tobytes()
                s.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, path)
            else:
                s.sendto(message, path)
        except OSError as exc:
            log.warning("sd_notify %r failed: %s", fields[0], exc)
            return False
    return True


# -- the fd store -----------------------------------------------------------------------------

# The names the broker stores space fds under: the space ids (sockets have other names).
STORED_NAME = re.compile(r"^sp-[0-9a-f]{8}$")


def fd_store_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether stored fds can reach the manager: under Type=notify (NOTIFY_SOCKET), unless the
    manager says its store holds nothing (systemd 254+ passes FDSTORE=max; 252 passes nothing,
    and a store of 0 there only logs a refusal and closes the fds it was sent)."""
    env = os.environ if env is None else env
    if not env.get("NOTIFY_SOCKET"):
        return False
    limit = env.get("FDSTORE")
    return limit is None or not limit.isdigit() or int(limit) > 0


def fd_store_add(name: str, fd: int) -> bool:
    """FDSTORE=1: the manager keeps a copy of `fd` under `name` across restarts of this
    service (not across `systemctl stop`); FDPOLL=0: it is never dropped on POLLHUP/POLLERR."""
    if not fd_store_enabled():
        return False
    return notify("FDSTORE=1", f"FDNAME={name}", "FDPOLL=0", fds=[fd])


def fd_store_remove(name: str) -> bool:
    """FDSTOREREMOVE=1: the manager closes every fd it stores under `name`."""
    if not fd_store_enabled():
        return False
    return notify("FDSTOREREMOVE=1", f"FDNAME={name}")


# Jobs that end this process with another one to follow (the fd store kept for it).
_RESTART_JOBS = frozenset({"restart", "try-restart", "reload-or-restart", "try-reload-or-restart"})


def stopping_for_good(timeout: float = 1.0, env: Mapping[str, str] | None = None) -> bool:
    """Whether this service is being stopped with no restart to follow, so that its fd store
    (the spaces) goes with it: asked of the manager (`systemctl list-jobs` for this unit, and
    its FileDescriptorStorePreserve=, systemd 254+) when SIGTERM comes. A `systemctl stop` (or
    a SIGTERM with no job: Restart=on-failure does not restart a clean exit) is for good; a
    restart job, or a store kept across stops, is not. False when it cannot tell (not under
    systemd, no systemctl, no answer within `timeout`): sessions are then told to resume, as
    before, and find out when they cannot."""
    env = os.environ if env is None else env
    if not env.get("NOTIFY_SOCKET") or not env.get("INVOCATION_ID"):
        return False
    unit = _own_unit()
    systemctl = shutil.which("systemctl")
    if unit is None or systemctl is None:
        return False
    # A user manager sets MANAGERPID for what it starts; the system manager does not.
    scope = ["--user"] if env.get("MANAGERPID") else []

    def ask(*args: str) -> str | None:
        try:
            return subprocess.run(
                [systemctl, *scope, "--no-pager", *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
                stdin=subprocess.DEVNULL,
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("cannot ask systemd whether %s restarts: %s", unit, exc)
            return None

    jobs = ask("list-jobs", "--no-legend", unit)
    if jobs is None:
        return False
    kinds = {f[2] for f in map(str.split, jobs.splitlines()) if len(f) >= 3 and f[1] == unit}
    if kinds & _RESTART_JOBS:
        return False
    preserve = ask("show", "--property=FileDescriptorStorePreserve", "--value", unit)
    return preserve is not None and preserve.strip() != "yes"


def _own_unit() -> str | None:
    """The service unit this process runs in, from its cgroup (the last `*.service` of the
    path: a user manager's own `user@UID.service` comes before it)."""
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        units = [p for p in line.rpartition(":")[2].split("/") if p.endswith(".service")]
        if units:
            return units[-1]
    return None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: what MONOTONIC_USEC= carries with RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def one_line(text: str) -> str:
    """A notification field value is one line: newlines would start new fields."""
    return " ".join(text.split())


# -- watchdog ---------------------------------------------------------------------------------


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds of WatchdogSec= (WATCHDOG_USEC) when the watchdog is meant for this process
    (WATCHDOG_PID is ours, or unset), else None. sd_watchdog_enabled(3)."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000


class Watchdog:
    """Feeds the systemd watchdog (`WATCHDOG=1`) at half its interval, from a thread of its own,
    but only while the event loop proves it runs: a task on the loop stamps `beat` every quarter
    interval, and the thread pings only if that stamp is at most half an interval old.

    So a loop stuck in a system call, a C extension or an endless callback stops the pings,
    and systemd stops (by default SIGABRT) and, with Restart=on-failure, restarts the daemon,
    while the thread itself (which would be alive through such a stall) proves nothing alone.
    """

    def __init__(self, interval_s: float, send: Callable[[str], object] = notify) -> None:
        self.interval = interval_s
        self.max_age = interval_s / 2
        self.beat = time.monotonic()
        self.pings = 0
        self.stalled_since: float | None = None
        self._send = send
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.beat = time.monotonic()
        self._task = loop.create_task(self._heartbeat())
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()
        log.info(
            "systemd watchdog: %g s; fed every %g s while the event loop runs",
            self.interval,
            self.interval / 2,
        )

    async def _heartbeat(self) -> None:
        period = self.interval / 4
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(period)

    def _run(self) -> None:
        while True:
            age = time.monotonic() - self.beat
            if age <= self.max_age:
                if self.stalled_since is not None:
                    log.warning(
                        "event loop runs again after %.1f s: feeding the systemd watchdog",
                        time.monotonic() - self.stalled_since,
                    )
                    self.stalled_since = None
                self._send("WATCHDOG=1")
                self.pings += 1
            elif self.stalled_since is None:
                self.stalled_since = self.beat
                log.error(
                    "event loop stalled: no heartbeat for %.1f s; not feeding the systemd "
                    "watchdog (systemd stops the daemon %g s after the last ping)",
                    age,
                    self.interval,
                )
            if self._stop.wait(self.interval / 2):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)


# -- status -----------------------------------------------------------------------------------


class StatusReporter:
    """Keeps systemd's status line (`systemctl status`, StatusText=) current: spaces, sessions
    and the last revocation, looked at every `period` seconds and sent when it changed.

    The broker keeps no time or global order of revocations: a new one is noticed when
    `revocations_total` moves, found as the newest report in a space queue's history, and stamped
    with the time it was noticed (within `period`).
    """

    def __init__(
        self, broker: Broker, period: float = 1.0, send: Callable[[str], object] = notify
    ) -> None:
        self.broker = broker
        self.period = period
        self.text = ""
        self._send = send
        self._total = broker.revocations_total
        self._seen: dict[str, int] = self._newest()
        self._last = ""
        # Shown after the counts until cleared (a failed reload says so here).
        self.note = ""

    def _newest(self) -> dict[str, int]:
        """space id -> identity of its newest revocation report."""
        return {
            space_id: id(queue.history[-1])
            for space_id, queue in list(self.broker.queues.items())
            if queue.history
        }

    def _revocation_text(self) -> str:
        newest = self._newest()
        fresh = [
            (space_id, self.broker.queues[space_id].history[-1])
            for space_id, ident in newest.items()
            if self._seen.get(space_id) != ident and space_id in self.broker.queues
        ]
        self._seen = newest
        when = time.strftime("%H:%M:%S")
        if not fresh:
            return f"last revoke {when} (its space is gone)"
        space_id, result = fresh[-1]
        outcomes = collections.Counter(c.outcome.value for c in result.clients)
        told = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())) or "no client"
        return (
            f"last revoke {when} space {space_id[:12]}: {told} in {result.duration_s * 1000:.1f} ms"
        )

    def compose(self) -> str:
        b = self.broker
        if b.revocations_total != self._total:
            self._total = b.revocations_total
            self._last = self._revocation_text()
        spaces = len(b.spaces)
        sessions = len(b.live_sessions())
        text = f"{spaces} space{'s' * (spaces != 1)}, {sessions} session{'s' * (sessions != 1)}"
        text += f", {self._total} revoke{'s' * (self._total != 1)}"
        if self._last:
            text += f"; {self._last}"
        if self.note:
            text += f"; {self.note}"
        return one_line(text)

    def update(self, force: bool = False) -> str:
        text = self.compose()
        if force or text != self.text:
            self.text = text
            self._send(f"STATUS={text}")
        return text

    async def run(self) -> None:
        while True:
            try:
                self.update()
            except Exception:  # a status line must never take the daemon down
                log.exception("status line failed")
            await asyncio.sleep(self.period)


# -- socket activation ------------------------------------------------------------------------


def listen_fds(
    env: MutableMapping[str, str] | None = None, unset: bool = True
) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, as (name, socket), in order; empty when none
    were passed to *this* pid. sd_listen_fds_with_names(3): LISTEN_PID, LISTEN_FDS,
    LISTEN_FDNAMES; the variables are removed (`unset`) so no child inherits them."""
    return [(name, socket.socket(fileno=fd)) for name, fd in passed_fds(env, unset)]


def split_passed(
    passed: list[tuple[str, int]],
) -> tuple[list[tuple[str, socket.socket]], dict[str, int]]:
    """Passed fds as (sockets, stored space fds by space id): a non-socket named like a space
    id came back from the fd store. Anything else that is not a socket is closed (logged)."""
    sockets: list[tuple[str, socket.socket]] = []
    stored: dict[str, int] = {}
    for name, fd in passed:
        try:
            is_socket = stat.S_ISSOCK(os.fstat(fd).st_mode)
        except OSError:
            continue
        if is_socket:
            sockets.append((name, socket.socket(fileno=fd)))
        elif STORED_NAME.match(name) and name not in stored:
            stored[name] = fd
        else:
            log.warning("closing fd %d passed by systemd as %r: not a socket or a space", fd, name)
            os.close(fd)
    return sockets, stored


def passed_fds(
    env: MutableMapping[str, str] | None = None, unset: bool = True
) -> list[tuple[str, int]]:
    """The fds systemd passed to this process (sockets, and fds from the fd store), as
    (name, fd), in order, marked close-on-exec; see `listen_fds`."""
    env = os.environ if env is None else env
    pid = env.get("LISTEN_PID", "")
    count = env.get("LISTEN_FDS", "")
    names_var = env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid != str(os.getpid()) or not count.isdigit() or int(count) == 0:
        return []
    n = int(count)
    names = names_var.split(":") if names_var is not None else []
    if len(names) != n:
        names = ["unknown"] * n
    passed = []
    for i, name in enumerate(names):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        passed.append((name, fd))
    return passed


# -- live upgrade: what a daemon hands the process it re-executes ----------------------------

# The variables a daemon sets for the program it re-executes (same pid): its fds as
# "name:fd,..." (sockets named control / session, space fds named by space id), the pid they
# are meant for, and which socket files the daemon owns (bound itself; else systemd's).
HANDOVER_FDS = "MEMBROKERD_HANDOVER_FDS"
HANDOVER_PID = "MEMBROKERD_HANDOVER_PID"
HANDOVER_OWNED = "MEMBROKERD_HANDOVER_OWNED"


def handover_env(fds: Sequence[tuple[str, int]], owned: Sequence[str]) -> dict[str, str]:
    """The environment entries that pass `fds` (name, fd) to a re-executed daemon."""
    return {
        HANDOVER_FDS: ",".join(f"{name}:{fd}" for name, fd in fds),
        HANDOVER_PID: str(os.getpid()),
        HANDOVER_OWNED: ",".join(owned),
    }


def handover_fds(
    env: MutableMapping[str, str] | None = None,
) -> tuple[list[tuple[str, int]], set[str]]:
    """The fds a previous daemon of this very pid handed over by re-executing (see
    `handover_env`), marked close-on-exec, and the names of the sockets whose files it owned;
    empty when there was no handover. The variables are removed."""
    env = os.environ if env is None else env
    spec = env.pop(HANDOVER_FDS, None)
    pid = env.pop(HANDOVER_PID, "")
    owned = {n for n in env.pop(HANDOVER_OWNED, "").split(",") if n}
    if spec is None or pid != str(os.getpid()):
        return [], set()
    out: list[tuple[str, int]] = []
    for item in spec.split(","):
        name, _, number = item.rpartition(":")
        if not name or not number.isdigit():
            log.warning("upgrade: ignoring a malformed handed-over fd %r", item)
            continue
        fd = int(number)
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            log.warning("upgrade: handed-over fd %s (%d) is not open: %s", name, fd, exc)
            continue
        out.append((name, fd))
    return out, owned


def _bound_path(sock: socket.socket) -> str:
    try:
        name: Any = sock.getsockname()
    except OSError:
        return ""
    return name if isinstance(name, str) else ""


def take_sockets(
    passed: list[tuple[str, socket.socket]],
    wanted: Mapping[str, Path],
    handed_over: bool = False,
) -> dict[str, socket.socket]:
    """Matches passed sockets to the daemon's (`wanted`: name -> configured path): by name
    (FileDescriptorName=control / session), else by the path the socket is bound to (one socket
    unit with two ListenStream= gives both the unit's name). Sockets matching nothing are
    closed. A match must be a listening Unix stream socket bound to the configured path, or the
    daemon refuses to start (clients would be looking for it elsewhere).
    """
    by_path = {str(path): name for name, path in wanted.items()}
    taken: dict[str, socket.socket] = {}
    for fd_name, sock in passed:
        path = _bound_path(sock) if sock.family == socket.AF_UNIX else ""
        name = fd_name if fd_name in wanted else by_path.get(path)
        if name is None or name in taken:
            log.warning(
                "ignoring a socket passed by systemd (name %r, address %r): not one of %s",
                fd_name,
                path or sock.getsockname(),
                ", ".join(f"{n} ({p})" for n, p in wanted.items()),
            )
            sock.close()
            continue
        taken[name] = sock
    try:
        for name, sock in taken.items():
            expected = str(wanted[name])
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise StartupRefused(
                    f"the {name} socket passed by systemd is not a Unix stream socket "
                    "(ListenStream= with a path is)"
                )
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise StartupRefused(f"the {name} socket passed by systemd is not listening")
            if _bound_path(sock) != expected and not handed_over:
                # (A handed-over socket was bound under a temporary name and renamed there.)
                raise StartupRefused(
                    f"the {name} socket passed by systemd is bound to "
                    f"{_bound_path(sock) or 'no path'}, but the configuration puts it at "
                    f"{expected} (make runtime_dir and the socket unit's ListenStream= agree)"
                )
    except BaseException:
        for sock in taken.values():
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return taken


__all__ = [
    "StatusReporter",
    "Watchdog",
    "fd_store_add",
    "fd_store_enabled",
    "fd_store_remove",
    "handover_env",
    "handover_fds",
    "listen_fds",
    "monotonic_usec",
    "notify",
    "one_line",
    "passed_fds",
    "split_passed",
    "take_sockets",
    "watchdog_interval",
]
