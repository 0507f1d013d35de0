"""Prometheus metrics of the daemon, served over HTTP on loopback by the event loop itself.

Gauges are read from the broker's state at scrape time (a collector), counters and histograms are
updated where things happen. Everything runs on the event loop thread: no locks.

The registry is the daemon's own (not prometheus_client's global one), so it carries the standard
`process_*`, `python_info` and `python_gc_*` collectors itself, plus `membroker_build_info`.
No `*_created` series are exposed: they double the series count and no rule uses them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from membrokerd import __version__
from membrokerd.journal import WRITE_KINDS

log = logging.getLogger("membrokerd.metrics")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the gauges show, taken from the broker at scrape time."""

    sessions: int
    spaces_by_backing: dict[str, int]
    bytes_shared: int
    bytes_private: int
    grant_fragments: int
    pins: int
    attachments: int
    open_fds: int
    # VA attachments by mode, and sealed mappings still served (inert ones included)
    va_sealed: int = 0
    va_cooperative: int = 0
    sealed_mappings: int = 0
    faults_mapped: int = 0
    faults_refused: int = 0
    faults_write_released: int = 0
    faults_read_ahead: int = 0
    # failed journal writes by kind (journal.WRITE_KINDS), and generations of the change log
    # whose fold failed (none without a journal)
    journal_errors: dict[str, int] = dataclasses.field(default_factory=dict)
    journal_unfolded: int = 0


class _StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield GaugeMetricFamily("membroker_sessions", "Live sessions.", value=s.sessions)
        spaces = GaugeMetricFamily("membroker_spaces", "Spaces, by backing.", labels=["backing"])
        for backing in ("memfd", "memfd-hugetlb", "guest_memfd"):
            spaces.add_metric([backing], s.spaces_by_backing.get(backing, 0))
        yield spaces
        space_bytes = GaugeMetricFamily(
            "membroker_space_bytes", "Bytes of all spaces, by attribute.", labels=["attribute"]
        )
        space_bytes.add_metric(["shared"], s.bytes_shared)
        space_bytes.add_metric(["private"], s.bytes_private)
        yield space_bytes
        yield GaugeMetricFamily(
            "membroker_grant_fragments",
            "Grant ranges held by client names (coalesced).",
            value=s.grant_fragments,
        )
        yield GaugeMetricFamily("membroker_pins", "Live pins.", value=s.pins)
        yield GaugeMetricFamily(
            "membroker_attachments", "Session attachments to spaces.", value=s.attachments
        )
        va = GaugeMetricFamily(
            "membroker_va_attachments", "VA attachments, by mode.", labels=["mode"]
        )
        va.add_metric(["sealed"], s.va_sealed)
        va.add_metric(["cooperative"], s.va_cooperative)
        yield va
        yield GaugeMetricFamily(
            "membroker_sealed_mappings",
            "Sealed mappings whose faults the broker serves (inert ones of detached clients "
            "included, until their process exits).",
            value=s.sealed_mappings,
        )
        faults = CounterMetricFamily(
            "membroker_faults",
            "Faults of sealed mappings served by the broker, by result.",
            labels=["result"],
        )
        faults.add_metric(["mapped"], s.faults_mapped)
        faults.add_metric(["refused"], s.faults_refused)
        faults.add_metric(["write_released"], s.faults_write_released)
        faults.add_metric(["read_ahead"], s.faults_read_ahead)
        yield faults
        errors = CounterMetricFamily(
            "membroker_journal_errors",
            "Writes the restart journal refused, by what was written: append (a change of an "
            "access table, in force but not journaled: a restart could undo it, a revoked "
            "grant come back), fold (of the change log into the database: kept and retried, "
            "see membroker_journal_unfolded_generations), write (any other database write: "
            "the call that made it failed, or revocation reports were lost). The daemon's log "
            "says what each was.",
            labels=["write"],
        )
        for kind in WRITE_KINDS:
            errors.add_metric([kind], s.journal_errors.get(kind, 0))
        yield errors
        yield GaugeMetricFamily(
            "membroker_journal_unfolded_generations",
            "Generations of the change log whose fold into the database failed, kept on disk "
            "(the newest few in memory too) and folded again at the next fold, oldest first, "
            "one transaction each.",
            value=s.journal_unfolded,
        )
        yield GaugeMetricFamily(
            "membroker_process_open_fds",
            "File descriptors the daemon holds.",
            value=s.open_fds,
        )


class Metrics:
    """The daemon's registry and the counters the broker updates."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        # prometheus_client decides this per process, at collect time, for every registry: the
        # daemon's is the only one in the process. (PROMETHEUS_DISABLE_CREATED_SERIES=true in the
        # environment does the same, but only if set before prometheus_client is imported.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(snapshot))
        # What prometheus_client's global registry would carry: process_cpu_seconds_total,
        # process_resident_memory_bytes, process_open_fds, process_max_fds,
        # process_start_time_seconds, ...; python_info; python_gc_*.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.build_info = Gauge(
            "membroker_build_info",
            "Always 1; the labels say which membrokerd, Python and grpcio this daemon runs.",
            ["version", "python", "grpcio"],
            registry=self.registry,
        )
        self.build_info.labels(__version__, platform.python_version(), grpc.__version__).set(1)
        self.daemon_starts = Counter(
            "membroker_daemon_starts_total",
            "Starts of membrokerd counted by this process: its own start, so 1 (the counter "
            "resets with the process; a restart shows in process_start_time_seconds).",
            registry=self.registry,
        )
        self.daemon_starts.inc()
        self.restored_spaces = Counter(
            "membroker_restored_spaces_total",
            "Spaces taken over from a previous membrokerd process at start (a restart that kept "
            "the guests' memory).",
            registry=self.registry,
        )
        self.resumed_sessions = Counter(
            "membroker_resumed_sessions_total",
            "Client sessions resumed after a membrokerd restart: a client that reconnected and "
            "got its attachments back without attaching again.",
            registry=self.registry,
        )
        self.revocations = Counter(
            "membroker_revocations_total",
            "Revocations carried out, by cause.",
            ["cause"],
            registry=self.registry,
        )
        self.revocation_clients = Counter(
            "membroker_revocation_clients_total",
            "Client outcomes of revocations (acked, fenced, gone, unverified, enforced).",
            ["outcome"],
            registry=self.registry,
        )
        self.fault_seconds = Histogram(
            "membroker_fault_handler_seconds",
            "Broker time per fault of a sealed mapping (read of the event to the answer).",
            buckets=(
                2e-6,
                4e-6,
                6e-6,
                8e-6,
                10e-6,
                12e-6,
                15e-6,
                20e-6,
                25e-6,
                30e-6,
                40e-6,
                50e-6,
                75e-6,
                100e-6,
                200e-6,
                500e-6,
                1e-3,
                5e-3,
            ),
            registry=self.registry,
        )
        self.revoke_latency = Histogram(
            "membroker_revoke_latency_seconds",
            "From the start of a revocation until every affected client is settled.",
            buckets=(
                50e-6,
                100e-6,
                200e-6,
                500e-6,
                1e-3,
                2e-3,
                5e-3,
                10e-3,
                50e-3,
                0.1,
                0.5,
                1,
                2,
                5,
                10,
            ),
            registry=self.registry,
        )
        self.fenced = Counter(
            "membroker_fenced_total",
            "Sessions fenced, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.fence_results = Counter(
            "membroker_fence_results_total",
            "What fencing achieved, checked against the kernel afterwards (disconnected, "
            "killed, still_mapped, exited).",
            ["result"],
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "membroker_event_loop_lag_seconds",
            "How late the event loop ran a periodic probe timer (loop_probe_ms): the time every "
            "other session waited behind the work in progress.",
            buckets=(1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=self.registry,
        )
        self.loop_lag_max = Gauge(
            "membroker_event_loop_lag_max_seconds",
            "The largest event-loop lag seen by the probe since the daemon started.",
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "membroker_session_protocol_errors_total",
            "Session connections closed for a protocol error.",
            registry=self.registry,
        )
        self.audits = Counter(
            "membroker_audits_total", "Full audits of client mappings.", registry=self.registry
        )
        self.audit_unverified = Counter(
            "membroker_audit_unverified_total",
            "Clients an audit found alive but could not read the mappings of (fenced unless "
            "on_unverifiable = report).",
            registry=self.registry,
        )
        self.verify_seconds = Histogram(
            "membroker_verify_seconds",
            "How long judging one acknowledgement against the kernel's view of the client "
            "took, by where: on the event loop (a PROCMAP_QUERY walk of its mappings) or on a "
            "worker thread (its maps text: a large process, or one whose walk slept).",
            ["where"],
            buckets=(50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 0.01, 0.05, 0.1, 0.5),
            registry=self.registry,
        )
        self.verify_on_loop = self.verify_seconds.labels("loop")
        self.verify_on_worker = self.verify_seconds.labels("worker")
        self.journal_wait = Histogram(
            "membroker_journal_wait_seconds",
            "How long a change's call spent writing it to the restart journal (capturing the "
            "change and appending it to the change log, on the event loop, before it is "
            "carried out): what the journal adds to the call, by change (revoke, grant_rw, "
            "grant_ro, share, private).",
            ["change"],
            buckets=(10e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1),
            registry=self.registry,
        )
        for change in ("revoke", "grant_rw", "grant_ro", "share", "private"):
            self.journal_wait.labels(change)  # each series from the start, at 0
        self.slow_walks = Counter(
            "membroker_slow_walks_total",
            "Walks of a client's mappings that slept over 2 ms (waiting for its mmap lock): "
            "each sends that client's acknowledgements to a worker thread for a while "
            "(1 s, doubling with each, up to 10 min).",
            registry=self.registry,
        )
        self.audit_seconds = Histogram(
            "membroker_audit_duration_seconds",
            "How long one full audit of every attached client took.",
            buckets=(1e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1, 5),
            registry=self.registry,
        )
        self.grants = Counter(
            "membroker_grant_calls_total", "Grant calls that succeeded.", registry=self.registry
        )
        self.rpc_errors = Counter(
            "membroker_rpc_errors_total",
            "Control calls that failed, by gRPC status code.",
            ["code"],
            registry=self.registry,
        )
        self._by_outcome = {
            o: self.revocation_clients.labels(o)
            for o in ("acked", "fenced", "gone", "unverified", "enforced")
        }
        self._by_cause: dict[str, Any] = {}

    def revoked(self, cause: str, duration: float, outcomes: list[str]) -> None:
        """Counts one finished revocation (label children are cached: this is a hot path)."""
        counter = self._by_cause.get(cause)
        if counter is None:
            counter = self._by_cause[cause] = self.revocations.labels(cause)
        counter.inc()
        self.revoke_latency.observe(duration)
        for outcome in outcomes:
            self._by_outcome[outcome].inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """A minimal HTTP/1.0 server for GET /metrics on the event loop."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self, address: str) -> str:
        host, _, port = address.rpartition(":")
        self.server = await asyncio.start_server(self._handle, host, int(port))
        bound = self.server.sockets[0].getsockname()
        self.url = f"http://{bound[0]}:{bound[1]}/metrics"
        return self.url

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            line = request.split(b"\r\n", 1)[0].split()
            if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
                status, body, ctype = b"405 Method Not Allowed", b"GET only\n", b"text/plain"
            elif line[1].split(b"?")[0] not in (b"/metrics", b"/"):
                status, body, ctype = b"404 Not Found", b"try /metrics\n", b"text/plain"
            else:
                status, body = b"200 OK", self.metrics.exposition()
                ctype = CONTENT_TYPE_LATEST.encode()
            head = (
                b"HTTP/1.0 "
                + status
                + b"\r\nContent-Type: "
                + ctype
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
            )
            writer.write(head + (body if line and line[0] != b"HEAD" else b""))
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
