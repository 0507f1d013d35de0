"""Restart gap (issue 10): how long calls to membrokerd fail while it restarts under a real
systemd manager, and how long until a restored space is readable again by its owner.

    .venv/bin/python bench/restart_bench.py [--repeats 5] [--grants 1000 100000]
        [--out bench/results/restart.md]

Runs `systemd --user` in a private mount namespace and cgroup subtree (UserManager from
tests/deploy/deploy_helpers.py: the shipped unit with the tests' drop-in; needs root and the v1
hybrid cgroups) and starts membrokerd.service under it. An owner 'vmm' creates a space, writes
4 MiB of random bytes, shares it and grants N page ranges to one client (N = 1,000 and 100,000),
so the journal and systemd's fd store hold something to restore. Then, each `--repeats` times,
round robin:

  kill -9     SIGKILL to MainPID; Restart=on-failure (RestartSec=1s) starts a new daemon
  restart     `systemctl --user restart membrokerd.service` (SIGTERM, then a new daemon)
  reload      `systemctl --user reload` (SIGHUP: the configuration is re-read in place)
  upgrade     live upgrade: SIGUSR2 to MainPID (what `membrokerctl upgrade` asks for over its
              session): the daemon re-executes itself in place (same pid), handing its
              listening sockets, the space's fd and the journal to the new process

and, with the first N only, two variants that are not the shipped set-up: kill -9 with a
RestartSec=0 drop-in (what the 1 s wait costs), and kill -9 / restart with membrokerd.socket
(socket activation: systemd holds the listening sockets while no daemon runs).

A probe thread issues a cheap call every 2 ms from before the action on: a new session
(connect + Hello/Welcome, not resuming) and `list_spaces`, until a call is answered by
the new daemon (its pid in the Welcome). The gap is the time from the action to the end of the
first successful call after the last failed call begun after the action (0 if none failed);
"failed" counts those calls. A call in flight at the action fails (with its session, or with
BrokerRestarting while the probe's session resumes: the probe opens a new session per call) and
is counted apart. Right after the new daemon answers, the probe thread
connects as the owner, attaches the space's fd and reads the 4 MiB back (retried until it
works): "readable" is the time from the action to that read's end. For reload nothing fails and
no new daemon answers: the probe stops at the first call begun 50 ms after `systemctl reload`
returned, and "readable" is only when the check ran. For upgrade the pid stays the same: the
probe asks GetStats instead of ListSpaces, and "the new daemon" is the first process whose
uptime says it started after the action.

Where the time goes comes from systemd's own CLOCK_MONOTONIC timestamps of the unit
(ActiveExit, InactiveEnter, ExecMainStart, ActiveEnter = READY=1) and the daemon's log line
"journal ...: N space(s) restored in X ms" (its wall-clock time mapped onto the monotonic clock).

Baselines in the same run: the daemon's cold start (fresh state dir, empty fd store: from
`systemctl --user start` to the first successful call), and outside systemd a bare Python start
(`python -c pass`) and one importing what the daemon imports. The whole run takes under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import membroker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "deploy"))
from deploy_helpers import (  # noqa: E402
    SERVICE,
    SOCKET,
    UserManager,
    child_env,
    skip_unless_manager_possible,
)
from revoke_bench import CpuMeter, git_state  # noqa: E402

MiB = 1 << 20
PAGE = 4096
DATA = 4 * MiB
PROBE_INTERVAL = 0.002
PROBE_TIMEOUT = 5.0
RECOVERY_TIMEOUT = 60.0
PROPS = (
    "ActiveExitTimestampMonotonic",
    "InactiveEnterTimestampMonotonic",
    "ExecMainStartTimestampMonotonic",
    "ActiveEnterTimestampMonotonic",
    "MainPID",
    "NFileDescriptorStore",
)
RESTORED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO membrokerd: journal \S+: "
    r"(\d+) space\(s\) restored in ([\d.]+) ms",
    re.M,
)
DAEMON_IMPORTS = "import membrokerd.__main__, membrokerd.server, uvloop"
IMPORTS = ("membrokerd.config", "membrokerd.server", "grpc", "membrokerd.broker", "uvloop")
ACTIVATED = "socket-activated"
# The shipped unit waits RestartSec=1s; one more row restarts with this drop-in instead.
FAST_RESTART = "RestartSec=0"
# The segments of a (re)start, each ending at one of these points in time; a missing point
# (a systemd timestamp an action does not set) merges its segment into the next.
SEGMENTS = (
    ("exit", "systemd acts (sees the death / sends SIGTERM)"),
    ("inactive", "old daemon stops / RestartSec= wait"),
    ("exec", "start job, fork (ExecMainStart)"),
    ("restore_start", "sandbox, Python start-up, imports, config, journal open"),
    ("restore_end", "journal load + fd store restore (daemon's log)"),
    ("ready", "sockets, gRPC server, READY=1 (ActiveEnter)"),
    ("first_ok", "READY=1 -> end of the first successful call"),
)


class Mismatch(Exception):
    """The restored space's bytes are not the ones written: not retried."""


def describe(exc: BaseException) -> str:
    """What a failed call ran into: the errno of the OSError under it, or the exception's type."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return errno.errorcode.get(seen.errno, str(seen.errno))
        seen = seen.__cause__ or seen.__context__
    return f"{type(exc).__name__} ({str(exc)[:60]})"


def probe_session(runtime_dir: str) -> membroker.Session:
    """A new session that does not resume (a probe's session lives for one call; one that
    resumed would hold the name the next probe asks for), asked again while the broker is
    busy or restarting during the handshake (BrokerBusy), as `membroker.connect` does."""
    deadline = time.monotonic() + PROBE_TIMEOUT
    delay = 0.005
    while True:
        try:
            left = max(0.1, deadline - time.monotonic())
            return membroker.Session("restart-probe", runtime_dir, timeout=left, resume=0)
        except membroker.BrokerBusy:
            if time.monotonic() + delay >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def probe_once(runtime_dir: str, stats: bool = False) -> tuple[str | None, int, float]:
    """One cheap call on a new session: (None, the answering daemon's pid, its uptime in s
    when `stats`, else 0) if it worked, else (what it failed on, 0, 0)."""
    try:
        with probe_session(runtime_dir) as s:
            if stats:
                return None, s.broker_pid, s.stats().uptime_seconds
            s.list_spaces()
            return None, s.broker_pid, 0.0
    except Exception as exc:
        return describe(exc), 0, 0.0


class Probe:
    """A thread calling every PROBE_INTERVAL. Once the action is set (`action_at`), it stops
    at the first success answered by another daemon than `old_pid` (or, with `settle_after`
    set, at the first success that started after that), then runs `readback` until it works."""

    def __init__(
        self,
        runtime_dir: Path,
        readback: Callable[[], None] | None,
        old_pid: int,
        same_pid: bool = False,
    ) -> None:
        self.runtime_dir = str(runtime_dir)
        # An upgrade: the new process has the old pid; it is told apart by its uptime.
        self.same_pid = same_pid
        self.readback = readback
        self.old_pid = old_pid
        self.attempts: list[tuple[float, float, str | None]] = []
        self.action_at: float | None = None
        self.settle_after: float | None = None
        self.recovered_at: float | None = None
        self.readable_at: float | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="restart-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            due = time.monotonic()
            while not self._stop.is_set():
                t0 = time.monotonic()
                err, pid, uptime = probe_once(self.runtime_dir, self.same_pid)
                t1 = time.monotonic()
                self.attempts.append((t0, t1, err))
                action, settle = self.action_at, self.settle_after
                # After a reload: a call begun once it settled; after an upgrade: a process
                # started after the action; else: another daemon answered.
                if settle is not None:
                    moved_on = t0 >= settle
                elif self.same_pid:
                    moved_on = action is not None and t1 - uptime >= action
                else:
                    moved_on = pid != self.old_pid
                if action is not None and err is None and t1 >= action and moved_on:
                    self.recovered_at = t1
                    break
                due += PROBE_INTERVAL
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                else:
                    due = time.monotonic()
            if self.recovered_at is not None and self.readback is not None:
                deadline = time.monotonic() + RECOVERY_TIMEOUT
                while True:
                    try:
                        self.readback()
                    except Mismatch:
                        raise
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(PROBE_INTERVAL)
                        continue
                    self.readable_at = time.monotonic()
                    break
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(PROBE_TIMEOUT + 5)


class ResumeProbe:
    """A session opened before the action that keeps calling (list_spaces every
    PROBE_INTERVAL): it resumes by itself after the action; `back_at` is the end of its first
    call that succeeded after one failed (BrokerRestarting) -- or None if none failed."""

    def __init__(self, runtime_dir: Path) -> None:
        self.session = membroker.connect("resume-probe", str(runtime_dir), timeout=PROBE_TIMEOUT)
        self.failed_since: float | None = None
        self.back_at: float | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resume-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.back_at is None:
            try:
                self.session.list_spaces()
            except Exception:
                self.failures += 1
                if self.session.closed:
                    return
            else:
                if self.failures:
                    self.back_at = time.monotonic()
            time.sleep(PROBE_INTERVAL)

    def stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.failures and self.back_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._thread.join(PROBE_TIMEOUT + 5)
        self.session.close()


@dataclass
class Run:
    action: str
    grants: int | None
    gap: float  # s, action -> the first success after the last failed call begun after it
    answered: float  # s, action -> end of the first call answered by the new daemon
    failed: int  # calls begun after the action that failed
    in_flight: int  # calls in flight at the action that failed
    errors: Counter[str]
    in_flight_errors: Counter[str]
    slowest: float  # s, the slowest call in the window
    readable: float | None
    command: float  # s, how long systemctl (or os.kill) took
    points: dict[str, float] = field(default_factory=dict)  # s after the action
    restored: int | None = None
    restore_ms: float | None = None
    # s, action -> a session connected before it answers again (resumed); None: never failed
    resumed: float | None = None


def show(sd: UserManager) -> dict[str, str]:
    return sd.show(SERVICE, *PROPS)


def stamp(props: dict[str, str], name: str, since: float) -> float | None:
    """A systemd monotonic timestamp (µs) as seconds after `since`, or None if unset/older."""
    usec = int(props.get(name, "0") or 0)
    if usec == 0 or usec / 1e6 < since:
        return None
    return usec / 1e6


def wall_to_monotonic(date: str, ms: str) -> float:
    """A log line's local wall-clock time (ms resolution) on this process's monotonic clock."""
    wall = time.mktime(time.strptime(date, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000 + 0.0005
    return wall - (time.time() - time.monotonic())


def measure(
    sd: UserManager,
    action: str,
    grants: int | None,
    readback: Callable[[], None] | None,
) -> Run:
    """One action with the probe running; waits until the unit is active again."""
    kind = action.split(",")[0]
    old_pid = sd.main_pid() if kind != "start" else 0
    log_offset = sd.log.stat().st_size if sd.log.exists() else 0
    probe = Probe(sd.runtime_dir, readback, old_pid, same_pid=kind == "upgrade")
    resumer = ResumeProbe(sd.runtime_dir) if kind != "start" else None
    try:
        time.sleep(0.05)  # the probe is running (succeeding, or failing for a cold start)
        t0 = time.monotonic()
        probe.action_at = t0
        if kind == "kill -9":
            os.kill(old_pid, signal.SIGKILL)
        elif kind in ("restart", "start"):
            sd.systemctl(kind, SERVICE)
        elif kind == "reload":
            sd.systemctl("reload", SERVICE)
            probe.settle_after = time.monotonic() + 0.05
        elif kind == "upgrade":
            os.kill(old_pid, signal.SIGUSR2)
        else:
            raise ValueError(action)
        command = time.monotonic() - t0
        if not probe.done.wait(RECOVERY_TIMEOUT):
            raise RuntimeError(f"{action}: no successful call within {RECOVERY_TIMEOUT} s")
    finally:
        probe.stop()
        if resumer is not None:
            resumer.stop(RECOVERY_TIMEOUT)
    if probe.error is not None:
        raise RuntimeError(f"{action}: the probe failed: {probe.error!r}") from probe.error
    assert probe.recovered_at is not None

    def settled() -> bool:
        s = sd.show(SERVICE, "ActiveState", "MainPID")
        return s["ActiveState"] == "active" and (
            kind == "reload"
            or (kind == "upgrade" and s["MainPID"] == str(old_pid))
            or s["MainPID"] not in ("0", str(old_pid))
        )

    sd.wait_for(f"the unit to be active after {action}", settled, timeout=RECOVERY_TIMEOUT)
    window = [a for a in probe.attempts if a[1] >= t0 and a[0] <= probe.recovered_at]
    # A call in flight at the action fails with its session (or BrokerRestarting): counted
    # apart; the gap is how long calls begun after the action fail.
    in_flight = [a for a in window if a[2] is not None and a[0] < t0]
    failed = [a for a in window if a[2] is not None and a[0] >= t0]
    gap = 0.0
    if failed:
        last = max(a[1] for a in failed)
        gap = min(a[1] for a in window if a[2] is None and a[1] > last) - t0
    run = Run(
        action=action,
        grants=grants,
        gap=gap,
        answered=probe.recovered_at - t0,
        failed=len(failed),
        in_flight=len(in_flight),
        errors=Counter(a[2] for a in failed if a[2] is not None),
        in_flight_errors=Counter(a[2] for a in in_flight if a[2] is not None),
        slowest=max(a[1] - a[0] for a in window),
        readable=probe.readable_at - t0 if probe.readable_at is not None else None,
        command=command,
    )
    if resumer is not None and resumer.back_at is not None:
        run.resumed = resumer.back_at - t0
    if kind == "reload":
        return run
    props = show(sd)
    points: dict[str, float | None] = {"action": t0}
    if kind != "start":
        points["exit"] = stamp(props, "ActiveExitTimestampMonotonic", t0)
        points["inactive"] = stamp(props, "InactiveEnterTimestampMonotonic", t0)
    points["exec"] = stamp(props, "ExecMainStartTimestampMonotonic", t0)
    points["ready"] = stamp(props, "ActiveEnterTimestampMonotonic", t0)
    points["first_ok"] = probe.recovered_at
    text = sd.log.read_bytes()[log_offset:].decode(errors="replace")
    found = list(RESTORED.finditer(text))
    if found:
        last = found[-1]
        end = wall_to_monotonic(last.group(1), last.group(2))
        run.restored, run.restore_ms = int(last.group(3)), float(last.group(4))
        points["restore_end"] = end
        points["restore_start"] = end - run.restore_ms / 1000
    run.points = {k: v - t0 for k, v in points.items() if v is not None}
    return run


# -- the space under test ------------------------------------------------------------------


@dataclass
class Guest:
    space_id: str
    data: bytes
    info: object
    grants: int

    def readback(self, runtime_dir: Path) -> None:
        with membroker.connect("vmm", str(runtime_dir), timeout=PROBE_TIMEOUT) as owner:
            client = owner.attach_fd(self.space_id)
            try:
                assert client.fd is not None
                got = os.pread(client.fd, len(self.data), 0)
            finally:
                client.close()
        if got != self.data:
            raise Mismatch(f"space {self.space_id}: the restored bytes differ")

    def verify(self, runtime_dir: Path) -> None:
        """Not timed: the space and every grant range are as they were made."""
        with membroker.connect("vmm", str(runtime_dir)) as owner:
            if owner.get_space(self.space_id) != self.info:
                raise Mismatch(f"space {self.space_id}: its description changed")
            held = owner.list_grants(self.space_id, "backend")
        if len(held) != self.grants:
            raise Mismatch(f"{len(held)} grant ranges after the restarts, not {self.grants}")
        self.readback(runtime_dir)


def make_guest(runtime_dir: Path, grants: int) -> Guest:
    size = max(64 * MiB, -(-2 * grants * PAGE // MiB) * MiB)
    data = random.Random(grants).randbytes(DATA)
    with membroker.connect("vmm", str(runtime_dir)) as owner:
        space = owner.create_space(size, name=f"restart-bench-{grants}")
        assert space.fd is not None
        os.pwrite(space.fd, data, 0)
        space.share(0, size)
        space.grant_many("backend", [(2 * i * PAGE, PAGE) for i in range(grants)], "ro")
        info = owner.get_space(space.space_id)
        space.close()
    return Guest(space.space_id, data, info, grants)


@contextlib.contextmanager
def restart_sec(sd: UserManager, fast: bool) -> Iterator[None]:
    """With `fast`, a drop-in (in the manager's temporary unit directory) replaces the shipped
    RestartSec=1s for the duration; `daemon-reload` keeps the running daemon and its fd store."""
    if not fast:
        yield
        return
    dropin = sd.units / f"{SERVICE}.d" / "restart-sec.conf"
    dropin.write_text(f"[Service]\n{FAST_RESTART}\n")
    sd.systemctl("daemon-reload")
    try:
        yield
    finally:
        dropin.unlink()
        sd.systemctl("daemon-reload")


def fresh_state(sd: UserManager) -> None:
    """Stopped (the fd store emptied), failures reset, no journal."""
    sd.reset()
    shutil.rmtree(sd.runtime_dir.with_name(sd.runtime_dir.name + ".state"), ignore_errors=True)


# -- baselines outside systemd ---------------------------------------------------------------


def python_start(code: str, n: int) -> list[float]:
    env = child_env()
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    out = []
    for _ in range(n + 1):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        out.append(time.monotonic() - t0)
    return out[1:]  # the first one warms the page cache


def import_times(n: int) -> dict[str, float]:
    """p50 cumulative import time (s) of the daemon's heaviest imports (`-X importtime`)."""
    env = child_env()
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    seen: dict[str, list[float]] = {}
    for _ in range(n):
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", DAEMON_IMPORTS],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        found: dict[str, float] = {}
        for line in err.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit():
                found.setdefault(parts[2].strip(), int(parts[1]) / 1e6)
        for name in IMPORTS:
            seen.setdefault(name, []).append(found.get(name, 0.0))
    return {name: statistics.median(v) for name, v in seen.items()}


# -- report --------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f}"


def p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def segment_row(runs: list[Run]) -> list[str]:
    """p50 of each segment between consecutive known points (merged across missing ones)."""
    cells = []
    order = ["action", *(name for name, _ in SEGMENTS)]
    for i, (name, _) in enumerate(SEGMENTS):
        values = []
        for r in runs:
            if name not in r.points:
                continue
            before = next((r.points[p] for p in reversed(order[: i + 1]) if p in r.points), None)
            if before is not None:
                values.append(r.points[name] - before)
        cells.append(ms(p50(values)))
    return cells


def resumed_cell(runs: list[Run]) -> str:
    if all(r.action == "start" for r in runs):
        return "—"
    return ms(p50([r.resumed or 0.0 for r in runs]))


def report(
    runs: list[Run],
    baselines: list[tuple[str, list[float]]],
    imports: dict[str, float],
    probe_cost: float,
) -> str:
    lines = [
        "| action | grant ranges | gap p50 ms | gap max ms | failed calls p50 (max) "
        "| in-flight calls failed (all repeats) "
        "| slowest call p50 ms | new daemon answers p50 ms | space readable again p50 ms "
        "| max ms | connected session answers again p50 ms | systemctl p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, int | None], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.action, r.grants), []).append(r)
    for (action, grants), rs in groups.items():
        readable = [r.readable for r in rs if r.readable is not None]
        name = "cold start (baseline)" if action == "start" else action
        lines.append(
            f"| {name} | {'—' if grants is None else f'{grants:,}'} "
            f"| {ms(p50([r.gap for r in rs]))} | {ms(max(r.gap for r in rs))} "
            f"| {statistics.median(r.failed for r in rs):.0f} ({max(r.failed for r in rs)}) "
            f"| {sum(r.in_flight for r in rs)} "
            f"| {ms(p50([r.slowest for r in rs]))} "
            f"| {'—' if action == 'reload' else ms(p50([r.answered for r in rs]))} "
            f"| {ms(p50(readable)) if readable else '—'} "
            f"| {ms(max(readable)) if readable else '—'} "
            f"| {resumed_cell(rs)} "
            f"| {ms(p50([r.command for r in rs]))} |"
        )
    lines += [
        "",
        "gap: from the action to the first successful call after the last failed call begun "
        "after it. failed calls: those begun after the action (one every ~2 ms while they fail "
        "fast); in-flight: calls whose session was open at the action. slowest call: the "
        "longest single call in the window (a call that waits in a listen backlog). new daemon "
        "answers: the first call answered by the new pid. readable: the owner reconnects, "
        "attach_fd, reads the 4 MiB back and compares; for reload only when that check ran. "
        "connected session: a session opened before the action calls list_spaces every ~2 ms; "
        "its calls fail with BrokerRestarting (retryable) while it resumes by itself: the time "
        "from the action to its first answer after that (0: no call failed).",
        "",
        "Where the time goes (p50 ms of each segment, from systemd's timestamps of the unit and "
        "the daemon's log; a segment an action has no timestamp for is merged into the next):",
        "",
        "| action | grant ranges | " + " | ".join(label for _, label in SEGMENTS) + " | restore "
        "(log) ms |",
        "|---|---:|" + "---:|" * (len(SEGMENTS) + 1),
    ]
    for (action, grants), rs in groups.items():
        if action.startswith("reload"):
            continue
        name = "cold start (baseline)" if action == "start" else action
        restore = [r.restore_ms for r in rs if r.restore_ms is not None]
        restore_cell = f"{statistics.median(restore):.1f}" if restore else "—"
        lines.append(
            f"| {name} | {'—' if grants is None else f'{grants:,}'} | "
            + " | ".join(segment_row(rs))
            + f" | {restore_cell} |"
        )
    errors: dict[str, Counter[str]] = {}
    for r in runs:
        errors.setdefault(r.action, Counter()).update(r.errors)
    in_flight: Counter[str] = Counter()
    for r in runs:
        in_flight.update(r.in_flight_errors)
    lines += [
        "",
        "Baselines outside systemd (p50 ms over the same repeats): "
        + "; ".join(f"{name} {ms(p50(v))}" for name, v in baselines)
        + "; cumulative import times (`-X importtime`, nested in each other as Python imports "
        "them): "
        + ", ".join(f"{name} {ms(t)}" for name, t in imports.items())
        + f". One probe call (new session + list_spaces) when the daemon is up: "
        f"{probe_cost * 1000:.1f} ms p50, so a gap is known to within about "
        f"{(probe_cost + PROBE_INTERVAL) * 1000:.0f} ms.",
        "",
        "What the failed calls ran into: "
        + "; ".join(
            f"{'cold start' if a == 'start' else a}: "
            + (", ".join(f"{k} x{v}" for k, v in c.most_common()) or "none")
            for a, c in errors.items()
        )
        + "; the calls in flight at an action failed with "
        + (", ".join(f"{k} x{v}" for k, v in in_flight.most_common()) or "nothing")
        + ".",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grants", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "restart.md")
    args = parser.parse_args()
    try:
        skip_unless_manager_possible()
    except BaseException as exc:  # pytest's Skipped
        print(f"restart_bench: cannot run here: {exc}", file=sys.stderr)
        return 1
    n = args.repeats
    load_before = os.getloadavg()
    cpu = CpuMeter()
    started = time.monotonic()
    runs: list[Run] = []
    probe_costs: list[float] = []
    base = Path(tempfile.mkdtemp(prefix="mbrestart-"))
    os.chmod(base, 0o755)
    sd = UserManager(base)
    try:
        sd.install_units()
        sd.start()
        for _ in range(n):
            fresh_state(sd)
            runs.append(measure(sd, "start", None, None))
            print(f"cold start: gap {ms(runs[-1].gap)} ms", flush=True)
        # The cost of one probe call, the daemon up and idle.
        for _ in range(50):
            t0 = time.monotonic()
            if probe_once(str(sd.runtime_dir))[0] is None:
                probe_costs.append(time.monotonic() - t0)
        for grants in args.grants:
            fresh_state(sd)
            sd.systemctl("start", SERVICE)
            t0 = time.monotonic()
            guest = make_guest(sd.runtime_dir, grants)
            print(f"{grants:,} grant ranges made in {time.monotonic() - t0:.1f} s", flush=True)
            stored = show(sd)["NFileDescriptorStore"]
            if stored != "1":
                raise RuntimeError(f"{stored} fd(s) in systemd's fd store, not 1")

            def readback(guest: Guest = guest) -> None:
                guest.readback(sd.runtime_dir)

            actions = ["kill -9", "restart", "reload", "upgrade"]
            if grants == args.grants[0]:
                actions.append(f"kill -9, {FAST_RESTART}")
            for _ in range(n):
                for action in actions:
                    with restart_sec(sd, action.endswith(FAST_RESTART)):
                        run = measure(sd, action, grants, readback)
                    if action != "reload" and run.restored != 1:
                        raise RuntimeError(f"{action}: {run.restored} space(s) restored, not 1")
                    runs.append(run)
                    print(
                        f"{action}, {grants:,} grants: gap {ms(run.gap)} ms, {run.failed} "
                        f"failed, readable {ms(run.readable)} ms",
                        flush=True,
                    )
            guest.verify(sd.runtime_dir)
            with membroker.connect("vmm", str(sd.runtime_dir)) as owner:
                owner.space(guest.space_id).delete()
        # Socket activation (membrokerd.socket): systemd holds the listening sockets while no
        # daemon runs, so a connection waits in the backlog instead of failing.
        grants = args.grants[0]
        fresh_state(sd)
        sd.systemctl("start", SOCKET)
        guest = make_guest(sd.runtime_dir, grants)  # its first connection starts the daemon
        if show(sd)["NFileDescriptorStore"] != "1":
            raise RuntimeError("socket-activated: the space's fd is not in the fd store")
        for _ in range(n):
            for action in (f"kill -9, {ACTIVATED}", f"restart, {ACTIVATED}"):
                run = measure(sd, action, grants, lambda g=guest: g.readback(sd.runtime_dir))
                if run.restored != 1:
                    raise RuntimeError(f"{action}: {run.restored} space(s) restored, not 1")
                runs.append(run)
                print(
                    f"{action}: gap {ms(run.gap)} ms, {run.failed} failed, slowest call "
                    f"{ms(run.slowest)} ms, readable {ms(run.readable)} ms",
                    flush=True,
                )
        guest.verify(sd.runtime_dir)
        fresh_state(sd)
    finally:
        sd.close()
        shutil.rmtree(base, ignore_errors=True)
    baselines = [
        ("`python -c pass`", python_start("pass", n)),
        (f"`python -c '{DAEMON_IMPORTS}'`", python_start(DAEMON_IMPORTS, n)),
    ]
    imports = import_times(n)
    wall = time.monotonic() - started
    load_after = os.getloadavg()
    table = report(runs, baselines, imports, statistics.median(probe_costs))
    table += (
        f"\n\nLoad average before / after the run: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"{cpu.summary()}; the whole run took {wall:.0f} s."
    )
    print(table)
    systemd_version = subprocess.run(
        ["systemctl", "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n", 1)[0]
    header = (
        f"# Restart gap\n\n`{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
        f"Linux {platform.release()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {systemd_version} (`systemd --user` in a private mount "
        f"namespace), {git_state()}, {n} repeats of each action, round robin.\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
