"""Runs the daemon: runtime directory and lock, sockets, gRPC server, metrics endpoint,
signals, graceful shutdown.

`serve(config)` is the whole life of a membrokerd process; `__main__` parses flags and calls it
under uvloop.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from grpc import aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from membroker.v1 import broker_pb2, broker_pb2_grpc
from membrokerd.broker import Broker
from membrokerd.config import BrokerConfig
from membrokerd.listener import (
    Listener,
    SocketFile,
    StartupRefused,
    check_socket_path,
    temporary_socket_path,
)
from membrokerd.metrics import MetricsServer
from membrokerd.servicer import Servicer, SessionCalls

log = logging.getLogger("membrokerd")

SERVICE = broker_pb2.DESCRIPTOR.services_by_name["MemBroker"].full_name


def _sd_notify(message: str) -> None:
    """Tells systemd (Type=notify) about our state, when started by it."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(message.encode(), path)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


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
    prepare_runtime_dir(config.runtime_dir)
    lock = DaemonLock.acquire(config.lock_file)
    control = config.control_socket
    try:
        # Both before binding either: refuse while nothing of ours exists yet.
        check_socket_path(control)
        check_socket_path(config.session_socket)
    except BaseException:
        lock.release()
        raise
    stop = asyncio.Event()
    broker: Broker | None = None
    listener: Listener | None = None
    server: aio.Server | None = None
    health: health_async.HealthServicer | None = None
    control_file: SocketFile | None = None
    metrics_server: MetricsServer | None = None
    audit: asyncio.Task[None] | None = None
    probe: asyncio.Task[None] | None = None
    signals: list[signal.Signals] = []
    try:
        broker = Broker(config, loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)

        listener = Listener(loop, config.session_socket, config.session_socket_mode, broker.accept)
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
        tmp = temporary_socket_path(control)
        old_umask = os.umask(0o777 & ~config.control_socket_mode)
        try:
            server.add_insecure_port(f"unix:{tmp}")
            await server.start()
        finally:
            os.umask(old_umask)
        os.chmod(tmp, config.control_socket_mode)
        control_file = SocketFile.install(tmp, control)
        await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)

        metrics_server = MetricsServer(broker.metrics)
        if config.metrics_address:
            broker.metrics_url = await metrics_server.start(config.metrics_address)

        if config.audit_interval_s > 0:
            audit = loop.create_task(broker.audit_forever())
        if config.loop_probe_ms > 0:
            probe = loop.create_task(probe_loop_lag(broker, config.loop_probe_ms / 1000))
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
        _sd_notify("READY=1")
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        log.info("shutting down")
        if audit is not None:
            audit.cancel()
        if probe is not None:
            probe.cancel()
        if control_file is not None:
            _sd_notify("STOPPING=1")
        if health is not None:
            await health.enter_graceful_shutdown()
        if listener is not None:
            listener.close()
        if broker is not None:
            broker.shutdown("broker shutting down")
        if server is not None:
            await server.stop(grace=1.0)
        if metrics_server is not None:
            await metrics_server.close()
        if control_file is not None:
            control_file.unlink()
        for sig in signals:
            loop.remove_signal_handler(sig)
        lock.release()
        log.info("stopped")


__all__ = ["DaemonLock", "StartupRefused", "prepare_runtime_dir", "serve"]
