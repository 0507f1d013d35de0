"""Runs the daemon: sockets, gRPC server, metrics endpoint, signals, graceful shutdown.

`serve(config)` is the whole life of a membrokerd process; `__main__` parses flags and calls it
under uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from grpc import aio
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from membroker.v1 import broker_pb2, broker_pb2_grpc
from membrokerd.broker import Broker
from membrokerd.config import BrokerConfig
from membrokerd.listener import Listener
from membrokerd.metrics import MetricsServer
from membrokerd.servicer import Servicer

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


async def serve(config: BrokerConfig, ready: asyncio.Event | None = None) -> None:
    """Serves until SIGTERM or SIGINT (or `stop` is set), then shuts down cleanly."""
    loop = asyncio.get_running_loop()
    config.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    broker = Broker(config, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    listener = Listener(loop, config.session_socket, config.session_socket_mode, broker.accept)
    server = aio.server(options=[("grpc.max_receive_message_length", 4 << 20)])
    broker_pb2_grpc.add_MemBrokerServicer_to_server(Servicer(broker), server)  # type: ignore[no-untyped-call]
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
    control = config.control_socket
    if control.exists() or control.is_symlink():
        control.unlink()
    old_umask = os.umask(0o777 & ~config.control_socket_mode)
    try:
        server.add_insecure_port(f"unix:{control}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(control, config.control_socket_mode)
    await health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)

    metrics_server = MetricsServer(broker.metrics)
    if config.metrics_address:
        broker.metrics_url = await metrics_server.start(config.metrics_address)

    audit = loop.create_task(broker.audit_forever()) if config.audit_interval_s > 0 else None
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
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if audit is not None:
            audit.cancel()
        _sd_notify("STOPPING=1")
        await health.enter_graceful_shutdown()
        listener.close()
        broker.shutdown("broker shutting down")
        await server.stop(grace=1.0)
        await metrics_server.close()
        for path in (control,):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopped")


__all__ = ["serve"]
