"""Runs the daemon: runtime directory and lock, sockets, gRPC server, metrics endpoint,
signals, graceful shutdown.

`serve(config)` is the whole life of a membrokerd process; `__main__` parses flags and calls it
under uvloop. Under systemd (membrokerd.systemd) it also says READY=1 / STATUS= / STOPPING=1,
feeds the watchdog while its event loop runs, reloads its configuration on SIGHUP, and takes
over the sockets of membrokerd.socket when started by socket activation.

Live upgrade (SIGUSR2, or the Upgrade call of `membrokerctl upgrade`): the daemon stops as for
a shutdown, except that it first gathers its listening sockets and its spaces' fds (`Handover`;
control.sock is replaced by a socket of its own, gRPC's cannot be passed), tells the sessions to
resume, closes its journal, and re-executes its own program in place (same pid), passing the
fds in MEMBROKERD_HANDOVER_FDS. The new process takes them like socket activation and the fd
store, restores the spaces from the journal, and says READY=1 with MAINPID= to systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

from grpc import aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from membroker.v1 import broker_pb2, broker_pb2_grpc
from membrokerd import systemd
from membrokerd.broker import Broker
from membrokerd.config import BrokerConfig, ConfigError, reload_config
from membrokerd.journal import Journal, JournalError, Writer
from membrokerd.listener import (
    Listener,
    Relay,
    SocketFile,
    StartupRefused,
    check_socket_path,
    temporary_socket_path,
)
from membrokerd.metrics import MetricsServer
from membrokerd.servicer import Servicer, SessionCalls

log = logging.getLogger("membrokerd")

SERVICE = broker_pb2.DESCRIPTOR.services_by_name["MemBroker"].full_name


# A runtime directory created directly in a directory every user may write (the fallback
# /tmp/membroker-UID) is private to the daemon's user; anywhere else it is world-traversable
# (the socket modes are the gate there).
PRIVATE_RUNTIME_DIR_MODE = 0o700
SHARED_RUNTIME_DIR_MODE = 0o755


def prepare_runtime_dir(path: Path) -> None:
    """Creates the runtime directory if needed, then refuses one that is not safe to serve from.

    Refused (StartupRefused): not a directory; owned by another uid than ours (someone else
    could replace our sockets, or made it to catch our clients); writable by group or others
    without the sticky bit (anyone could unlink and re-create our sockets).
    """
    if not os.path.lexists(path):
        parent = path.parent
        parent.mkdir(parents=True, exist_ok=True)
        in_shared = os.stat(parent).st_mode & stat.S_IWOTH
        mode = PRIVATE_RUNTIME_DIR_MODE if in_shared else SHARED_RUNTIME_DIR_MODE
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass  # created meanwhile (by a racing daemon, or someone else): checked below
        else:
            os.chmod(path, mode)  # mkdir's mode was filtered by the umask
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise StartupRefused(f"runtime directory {path}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        link_owner = st.st_uid
        if link_owner not in (os.geteuid(), 0):
            raise StartupRefused(
                f"runtime directory {path} is a symlink owned by uid {link_owner}: refusing it"
            )
        st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupRefused(f"runtime directory {path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise StartupRefused(
            f"runtime directory {path} is owned by uid {st.st_uid}, not by this daemon's uid "
            f"{os.geteuid()}: refusing to serve from it"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise StartupRefused(
            f"runtime directory {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}) and not sticky: anyone could replace its sockets"
        )


class DaemonLock:
    """An exclusive flock on RUNTIME_DIR/membrokerd.lock, held for the daemon's life, with our
    pid written in it. One runtime directory, one daemon."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, path: Path) -> DaemonLock:
        """Takes the lock or raises StartupRefused naming the daemon that holds it."""
        for _ in range(10):
            # O_NOFOLLOW: the lock file itself is never a symlink into somewhere else.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f"pid {holder}" if holder.isdigit() else "pid unknown"
                raise StartupRefused(
                    f"another membrokerd ({who}) serves {path.parent} (it holds {path})"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # Kernel fact: a flock belongs to the inode we opened. A daemon that stops unlinks
            # the file before it unlocks, so a lock won on a file that is no longer at `path`
            # proves nothing: open the path again.
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(path, fd)
            os.close(fd)
        raise StartupRefused(f"cannot take {path}: it keeps being replaced")

    def release(self) -> None:
        """Removes the lock file while still holding it, then lets go."""
        if self.fd < 0:
            return
        try:
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1


LOOP_SWITCH_INTERVAL_S = 0.001


async def probe_loop_lag(broker: Broker, period: float) -> None:
    """Measures how late the loop runs a timer of `period`: what a revocation, a ping or an
    accept waits behind whatever work holds the loop (metrics: loop_lag, loop_lag_max)."""
    loop = asyncio.get_running_loop()
    worst = 0.0
    while True:
        due = loop.time() + period
        await asyncio.sleep(period)
        lag = max(0.0, loop.time() - due)
        broker.metrics.loop_lag.observe(lag)
        if lag > worst:
            worst = lag
            broker.metrics.loop_lag_max.set(worst)


def reload(broker: Broker, status: systemd.StatusReporter) -> None:
    """SIGHUP (`systemctl reload`): reads the configuration again and applies what can change
    while running (see config.RESTART_REQUIRED for what cannot); an invalid one is logged and
    the running one kept."""
    systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
    try:
        found = reload_config(broker.config)
    except Exception as exc:
        if isinstance(exc, ConfigError):
            log.error("reload refused, the running configuration stays in force: %s", exc)
        else:
            log.exception("reload failed, the running configuration stays in force")
        status.note = f"reload at {time.strftime('%H:%M:%S')} failed, old configuration kept"
        systemd.notify("READY=1")
        status.update(force=True)
        return
    status.note = ""
    # The broker reads its settings from broker.config each time it uses one.
    broker.config = found.config
    logging.getLogger().setLevel(found.config.log_level)
    if found.applied:
        log.info(
            "reloaded: applied %s",
            ", ".join(f"{n}={getattr(found.config, n)!r}" for n in found.applied),
        )
    else:
        log.info("reloaded: nothing changed that can change while running")
    if found.need_restart:
        log.warning(
            "reloaded, but changed settings that only take effect after a restart were NOT "
            "applied: %s",
            ", ".join(found.need_restart),
        )
    systemd.notify("READY=1")
    status.update(force=True)


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def restore(broker: Broker, config: BrokerConfig, stored: dict[str, int]) -> None:
    """Opens the journal (state_dir) and takes back the spaces it holds, each with its fd from
    systemd's fd store (`stored`, emptied here). Without a journal, stored fds are dropped."""
    directory = config.journal_dir
    if directory is None:
        for space_id in stored:
            log.warning("fd store: dropping %s: no journal (state_dir is empty)", space_id)
            systemd.fd_store_remove(space_id)
        _close_all(stored)
        return
    try:
        writer = Writer(Journal(directory))
    except JournalError as exc:
        raise StartupRefused(f"{exc} (state_dir)") from exc
    fd_store = systemd.fd_store_enabled()
    t0 = time.perf_counter()
    try:
        restored = broker.restore(writer, stored, fd_store)
    except BaseException as exc:
        writer.close()
        broker.journal = None
        if isinstance(exc, JournalError):
            raise StartupRefused(f"{exc} (state_dir)") from exc
        raise
    finally:
        stored.clear()  # used or closed by restore()
    log.info(
        "journal %s: %d space(s) restored in %.1f ms; space fds %s",
        writer.journal.path,
        restored,
        (time.perf_counter() - t0) * 1000,
        "go to systemd's fd store"
        if fd_store
        else "are not kept (no fd store: not under "
        "systemd Type=notify, or FileDescriptorStoreMax=0)",
    )


def _socket_file(path: Path) -> SocketFile:
    st = os.lstat(path)
    return SocketFile(path, st.st_dev, st.st_ino)


class Handover:
    """What a live upgrade passes to the re-executed daemon: inheritable copies of fds."""

    def __init__(self) -> None:
        self.fds: list[tuple[str, int]] = []
        self.owned: list[str] = []

    def add(self, name: str, fd: int) -> None:
        self.fds.append((name, os.dup(fd)))

    def close(self) -> None:
        for _, fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def execute(self) -> None:
        """Re-executes this program (same argv, same pid) with the fds; on failure, closes
        them and raises (the daemon then exits with an error: under systemd it is restarted
        and takes the spaces back from the fd store)."""
        env = dict(os.environ)
        env.update(systemd.handover_env(self.fds, self.owned))
        for _, fd in self.fds:
            os.set_inheritable(fd, True)
        argv = list(sys.orig_argv)
        log.info("upgrade: executing %s with %d fd(s)", " ".join(argv), len(self.fds))
        for handler in logging.getLogger().handlers:
            handler.flush()
        try:
            os.execve(sys.executable, argv, env)
        except OSError as exc:
            self.close()
            raise StartupRefused(f"upgrade: cannot execute {sys.executable}: {exc}") from exc


def _hand_over(
    broker: Broker,
    config: BrokerConfig,
    listener: Listener | None,
    relay: Relay | None,
    control_file: SocketFile | None,
) -> Handover:
    """Gathers the listening sockets and the spaces' fds for the next process, before this
    one closes anything: connections made from now on wait in the sockets' backlogs. The
    control socket gRPC listens on cannot be passed (gRPC adopts no socket): a new one is
    bound and renamed over control.sock first, and the next process relays it to its gRPC
    server."""
    passing = Handover()
    try:
        if listener is not None:
            passing.add("session", listener.sock.fileno())
            if listener.file is not None:
                passing.owned.append("session")
        if relay is not None:
            passing.add("control", relay.sock.fileno())
            if control_file is not None:
                passing.owned.append("control")
        elif control_file is not None:
            sock = _bind_control_handover(config.control_socket, config.control_socket_mode)
            try:
                passing.add("control", sock.fileno())
            finally:
                sock.close()
            passing.owned.append("control")
        for space in broker.spaces.values():
            if not space.ephemeral and not space.deleting:
                passing.add(space.space_id, space.fd)
    except BaseException:
        passing.close()
        raise
    log.info(
        "upgrade: handing over %d socket(s) and %d space(s)",
        sum(1 for n, _ in passing.fds if n in ("control", "session")),
        sum(1 for n, _ in passing.fds if n not in ("control", "session")),
    )
    return passing


def _bind_control_handover(path: Path, mode: int) -> socket.socket:
    """A listening socket renamed over `path` (control.sock): from this moment new control
    connections queue on it, for the next process."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.handover")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(tmp))
        finally:
            os.umask(old_umask)
        os.chmod(tmp, mode)
        sock.listen(4096)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return sock


async def serve(config: BrokerConfig, ready: asyncio.Event | None = None) -> None:
    """Serves until SIGTERM or SIGINT (or `stop` is set), then shuts down cleanly.

    Startup refuses (StartupRefused, an OSError: exit status 1) rather than disturb another
    daemon: the runtime directory must be safe, its lock free, and no server may answer on
    control.sock or session.sock. Whatever fails later (a metrics port in use) undoes what this
    process set up -- and only that.
    """
    loop = asyncio.get_running_loop()
    # Workers (large encodings, verifications) hand the GIL back to the event loop within
    # 1 ms instead of Python's default 5 ms: the loop waits less behind them.
    sys.setswitchinterval(LOOP_SWITCH_INTERVAL_S)
    # Sockets (socket activation) and space fds (systemd's fd store, named by space id); or
    # the same, handed over by the daemon this process re-executes (a live upgrade).
    passed, stored = systemd.split_passed(systemd.passed_fds())
    handover, owned = systemd.handover_fds()
    handed, handed_stored = systemd.split_passed(handover)
    for space_id, fd in handed_stored.items():
        if space_id in stored:
            os.close(fd)  # the fd store gave it back too
        else:
            stored[space_id] = fd
    try:
        prepare_runtime_dir(config.runtime_dir)
        lock = DaemonLock.acquire(config.lock_file)
    except BaseException:
        for _, sock in passed + handed:
            sock.close()
        _close_all(stored)
        raise
    control = config.control_socket
    wanted = {"control": control, "session": config.session_socket}
    try:
        # Socket activation: systemd's sockets are used as they are (and never removed).
        adopted = systemd.take_sockets(passed, wanted)
        for name, sock in systemd.take_sockets(handed, wanted, handed_over=True).items():
            if name in adopted:
                sock.close()
            else:
                adopted[name] = sock
        # The handed-over socket files the previous daemon bound are this daemon's now.
        own_files = {name: _socket_file(wanted[name]) for name in owned if name in adopted}
        # Both before binding either: refuse while nothing of ours exists yet.
        for name, path in wanted.items():
            if name not in adopted:
                check_socket_path(path)
    except BaseException:
        for _, sock in passed + handed:
            sock.close()
        _close_all(stored)
        lock.release()
        raise
    stop = asyncio.Event()
    upgrading = False

    def request_upgrade() -> None:
        """SIGUSR2 or the Upgrade call: stop, handing everything to a new process."""
        nonlocal upgrading
        if not upgrading:
            log.info("upgrade requested: re-executing %s", " ".join(sys.orig_argv))
            upgrading = True
            stop.set()

    broker: Broker | None = None
    listener: Listener | None = None
    server: aio.Server | None = None
    health: health_async.HealthServicer | None = None
    control_file: SocketFile | None = None
    metrics_server: MetricsServer | None = None
    audit: asyncio.Task[None] | None = None
    probe: asyncio.Task[None] | None = None
    relay: Relay | None = None
    private_control: SocketFile | None = None
    watchdog: systemd.Watchdog | None = None
    status_task: asyncio.Task[None] | None = None
    signals: list[signal.Signals] = []
    try:
        broker = Broker(config, loop)
        restore(broker, config, stored)
        status = systemd.StatusReporter(broker)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
        loop.add_signal_handler(signal.SIGHUP, reload, broker, status)
        signals.append(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGUSR2, request_upgrade)
        signals.append(signal.SIGUSR2)
        broker.request_upgrade = request_upgrade

        listener = Listener(
            loop,
            config.session_socket,
            config.session_socket_mode,
            broker.accept,
            adopted=adopted.pop("session", None),
        )
        if "session" in own_files:
            listener.file = own_files["session"]
        server = aio.server(options=[("grpc.max_receive_message_length", 4 << 20)])
        servicer = Servicer(broker)
        broker.calls = SessionCalls(servicer, config.max_frame_bytes)
        broker_pb2_grpc.add_MemBrokerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        health = health_async.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            [
                SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        # gRPC unlinks any socket at the path it binds, and unlinks that path again when it
        # stops, whoever's file it is by then. So it binds a name of ours, which is renamed
        # over control.sock; at shutdown it unlinks that (long gone) name, and we remove
        # control.sock only if it still is the file we bound.
        # Socket activation: gRPC cannot adopt systemd's socket, so it listens on that private
        # name (owner only) and the daemon relays what systemd's control.sock accepts to it.
        control_fd = adopted.pop("control", None)
        mode = config.control_socket_mode if control_fd is None else 0o600
        tmp = temporary_socket_path(control)
        old_umask = os.umask(0o777 & ~mode)
        try:
            server.add_insecure_port(f"unix:{tmp}")
            await server.start()
        finally:
            os.umask(old_umask)
        os.chmod(tmp, mode)
        if control_fd is None:
            control_file = SocketFile.install(tmp, control)
        else:
            st = os.lstat(tmp)
            private_control = SocketFile(tmp, st.st_dev, st.st_ino)
            relay = Relay(loop, control_fd, tmp)
            control_file = own_files.get("control")
        await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)

        metrics_server = MetricsServer(broker.metrics)
        if config.metrics_address:
            broker.metrics_url = await metrics_server.start(config.metrics_address)

        if config.audit_interval_s > 0:
            audit = loop.create_task(broker.audit_forever())
        if config.loop_probe_ms > 0:
            probe = loop.create_task(probe_loop_lag(broker, config.loop_probe_ms / 1000))
        interval = systemd.watchdog_interval()
        if interval is not None:
            watchdog = systemd.Watchdog(interval)
            watchdog.start(loop)
        log.info(
            "membrokerd %d ready: control %s, session %s, metrics %s",
            os.getpid(),
            control,
            config.session_socket,
            broker.metrics_url or "off",
        )
        print(
            f"membrokerd ready\n  control socket: {control}\n  session socket: "
            f"{config.session_socket}\n  metrics:        {broker.metrics_url or 'off'}",
            flush=True,
        )
        status.text = status.compose()
        if handover:
            # Re-executed by a live upgrade: same pid, so systemd's main pid stays ours.
            systemd.notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={status.text}")
            log.info("upgrade: this process took over %d fd(s)", len(handover))
        else:
            systemd.notify("READY=1", f"STATUS={status.text}")
        if os.environ.get("NOTIFY_SOCKET"):
            status_task = loop.create_task(status.run())
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        log.info("upgrading" if upgrading else "shutting down")
        if audit is not None:
            audit.cancel()
        if probe is not None:
            probe.cancel()
        if status_task is not None:
            status_task.cancel()
        passing: Handover | None = None
        if upgrading and broker is not None:
            systemd.notify(
                "RELOADING=1",
                f"MONOTONIC_USEC={systemd.monotonic_usec()}",
                "STATUS=upgrading: handing over to a new process",
            )
            try:
                passing = _hand_over(broker, config, listener, relay, control_file)
            except Exception:
                log.exception("upgrade: cannot hand over; shutting down instead")
                passing = None
            else:
                # Their files are the next process's now: not removed here.
                if listener is not None:
                    listener.file = None
                control_file = None
        elif control_file is not None or relay is not None:
            systemd.notify("STOPPING=1", "STATUS=shutting down")
        # Accept nothing more first: with systemd's sockets, a connection made from now on
        # waits in their backlog for the next daemon instead of being refused by this one.
        if listener is not None:
            listener.close()
        if relay is not None:
            relay.stop_accepting()
        if health is not None:
            await health.enter_graceful_shutdown()
        if broker is not None:
            if passing is not None:
                broker.shutdown("broker upgrading: reconnect and resume", restarting=True)
            elif not broker.fd_store:
                broker.shutdown("broker shutting down", restarting=False)
            elif await loop.run_in_executor(None, systemd.stopping_for_good):
                # `systemctl stop` empties the fd store: the spaces end here, and sessions are
                # told so instead of retrying for their resume window.
                broker.shutdown(
                    "broker stopped by its service manager: its spaces are gone",
                    restarting=False,
                )
            else:
                # Under systemd's fd store the state outlives this process (a restart takes it
                # back): sessions are told to resume.
                broker.shutdown("broker shutting down", restarting=True)
        if server is not None:
            await server.stop(grace=1.0)
        if broker is not None:
            broker.close_journal()
        _close_all(stored)
        if relay is not None:
            relay.close()
        if metrics_server is not None:
            await metrics_server.close()
        if control_file is not None:
            control_file.unlink()
        if private_control is not None:
            private_control.unlink()
        if watchdog is not None:
            watchdog.stop()
        for sock in adopted.values():
            sock.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
        lock.release()
        if passing is not None:
            passing.execute()  # returns only if the exec failed
        log.info("stopped")


__all__ = ["DaemonLock", "StartupRefused", "prepare_runtime_dir", "serve"]
