"""Prometheus side of the deployment: the rules file, the daemon's real exposition (promtool lint,
expected names), and a real Prometheus server scraping the daemon and loading the rules."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from deploy_helpers import ROOT, RULES, RULES_TEST, Daemon, require_tool, samples

import membrokerd

# Family name -> type, as `# TYPE` lines of the classic text exposition give them.
EXPECTED_FAMILIES = {
    "membroker_sessions": "gauge",
    "membroker_spaces": "gauge",
    "membroker_space_bytes": "gauge",
    "membroker_grant_fragments": "gauge",
    "membroker_pins": "gauge",
    "membroker_attachments": "gauge",
    "membroker_process_open_fds": "gauge",
    "membroker_revocations_total": "counter",
    "membroker_revocation_clients_total": "counter",
    "membroker_revoke_latency_seconds": "histogram",
    "membroker_verify_seconds": "histogram",
    "membroker_slow_walks_total": "counter",
    "membroker_journal_wait_seconds": "histogram",
    "membroker_journal_errors_total": "counter",
    "membroker_journal_unfolded_generations": "gauge",
    "membroker_fenced_total": "counter",
    "membroker_session_protocol_errors_total": "counter",
    "membroker_grant_calls_total": "counter",
    "membroker_rpc_errors_total": "counter",
    "membroker_build_info": "gauge",
    "membroker_daemon_starts_total": "counter",
    "membroker_restored_spaces_total": "counter",
    "membroker_resumed_sessions_total": "counter",
    # the standard process and runtime collectors, on the daemon's own registry
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
    "process_start_time_seconds": "gauge",
    "python_info": "gauge",
    "python_gc_collections_total": "counter",
}

# Series that exist before anything happens (labelled counters appear on first use).
EXPECTED_SAMPLES = [
    'membroker_spaces{backing="memfd"}',
    'membroker_spaces{backing="memfd-hugetlb"}',
    'membroker_spaces{backing="guest_memfd"}',
    'membroker_space_bytes{attribute="shared"}',
    'membroker_space_bytes{attribute="private"}',
    'membroker_revocation_clients_total{outcome="acked"}',
    'membroker_revocation_clients_total{outcome="fenced"}',
    'membroker_revocation_clients_total{outcome="gone"}',
    'membroker_revoke_latency_seconds_bucket{le="+Inf"}',
    "membroker_revoke_latency_seconds_count",
    'membroker_verify_seconds_count{where="loop"}',
    'membroker_verify_seconds_count{where="worker"}',
    "membroker_slow_walks_total",
    'membroker_journal_wait_seconds_count{change="revoke"}',
    'membroker_journal_wait_seconds_count{change="grant_rw"}',
    'membroker_journal_errors_total{write="append"}',
    'membroker_journal_errors_total{write="fold"}',
    'membroker_journal_errors_total{write="write"}',
    "membroker_journal_unfolded_generations",
    "membroker_session_protocol_errors_total",
    "membroker_daemon_starts_total",
    "membroker_restored_spaces_total",
    "membroker_resumed_sessions_total",
]


def families(exposition: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))


@pytest.fixture(scope="module")
def exposition(daemon: Daemon) -> str:
    """The daemon's /metrics after one session was closed for a protocol error."""
    assert b"exceeds the limit" in daemon.send_garbage_frame()
    deadline = time.monotonic() + 5
    while True:
        ctype, body = daemon.scrape()
        if samples(body).get("membroker_session_protocol_errors_total", 0) >= 1:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    # promtool rejects OpenMetrics: the endpoint must serve the classic text format
    # (prometheus_client labels it version=0.0.4 or, since 0.22, version=1.0.0).
    assert ctype.startswith("text/plain"), ctype
    assert "# EOF" not in body
    return body


def test_promtool_check_rules() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests() -> None:
    """Each alert fires on a synthetic incident and stays quiet on a healthy broker."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_only_metrics_the_daemon_exports(exposition: str) -> None:
    exported = families(exposition)
    used = set(re.findall(r"\bmembroker_[a-z_]+\b", RULES.read_text()))
    assert used, "no metric names found in the rules"
    for name in sorted(used):
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        assert name in exported or family in exported, f"rules use {name}, not exported"


def test_expected_metric_names_present(exposition: str) -> None:
    assert families(exposition).items() >= EXPECTED_FAMILIES.items(), families(exposition)
    present = samples(exposition)
    for sample in EXPECTED_SAMPLES:
        assert sample in present, sample
    assert present["membroker_session_protocol_errors_total"] >= 1
    assert present["membroker_process_open_fds"] > 0
    assert present["membroker_sessions"] == 0


def test_build_info_names_this_build(exposition: str) -> None:
    """One membroker_build_info series, value 1, with the version the package declares."""
    series = {k: v for k, v in samples(exposition).items() if k.startswith("membroker_build_info")}
    assert len(series) == 1, series
    [(name, value)] = series.items()
    assert value == 1
    labels = dict(re.findall(r'(\w+)="([^"]*)"', name))
    # The daemon runs this interpreter (sys.executable) with this checkout's packages.
    assert labels == {
        "version": membrokerd.__version__,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }, name
    assert membrokerd.__version__ == importlib.metadata.version("membroker")


def test_process_metrics_describe_the_daemon(exposition: str) -> None:
    present = samples(exposition)
    assert present["process_open_fds"] > 0
    assert present["process_max_fds"] >= present["process_open_fds"]
    assert present["process_resident_memory_bytes"] > 1 << 20
    assert present["process_cpu_seconds_total"] > 0
    # This module's daemon started moments ago (clock ticks since boot: within a second).
    assert time.time() - 300 < present["process_start_time_seconds"] <= time.time() + 1
    assert any(k.startswith("python_info{") for k in present)


def test_no_created_series(exposition: str) -> None:
    """No *_created samples (nor their HELP/TYPE lines): disabled for the daemon's registry."""
    created = [line for line in exposition.splitlines() if "_created" in line]
    assert not created, created
    # ... while the counters and histograms they would accompany are there.
    assert "membroker_revocation_clients_total" in families(exposition)
    assert "membroker_revoke_latency_seconds" in families(exposition)


def test_restart_counters_start_at_their_values(exposition: str) -> None:
    present = samples(exposition)
    assert present["membroker_daemon_starts_total"] == 1
    assert present["membroker_restored_spaces_total"] == 0
    assert present["membroker_resumed_sessions_total"] == 0


def test_readme_lists_every_membroker_family(exposition: str) -> None:
    """The README's Metrics section names every membroker_* family the daemon exports."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Metrics", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\bmembroker_[a-z_]+\b", section))
    exported = {f for f in families(exposition) if f.startswith("membroker_")}
    assert exported - listed == set(), "exported but not in the README"
    assert listed - exported == set(), "in the README but not exported"


def test_promtool_check_metrics_clean(exposition: str) -> None:
    """Parses and passes promtool's lint: rc 0 and no output at all."""
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True, timeout=60
    )
    output = (result.stdout + result.stderr).strip()
    assert (result.returncode, output) == (0, ""), output


def test_sigterm_stops_daemon_with_status_zero(daemon: Daemon) -> None:
    """Last in this module: SIGTERM by pid, exit status 0, both sockets removed."""
    assert (daemon.runtime_dir / "control.sock").exists()
    assert (daemon.runtime_dir / "session.sock").exists()
    assert daemon.stop() == 0, daemon.log()
    assert not (daemon.runtime_dir / "control.sock").exists()
    assert not (daemon.runtime_dir / "session.sock").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else base + path
    with urllib.request.urlopen(url, timeout=5) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


@pytest.mark.peer
def test_prometheus_server_scrapes_daemon_and_loads_rules(tmp_path: Path) -> None:
    """A real Prometheus on loopback scrapes a fresh daemon as job "membroker" with our rules."""
    prometheus = require_tool("prometheus")
    d = Daemon(tmp_path / "rt")
    prom = None
    try:
        target = urllib.parse.urlsplit(d.metrics_url).netloc
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(RULES))}\n"
            "scrape_configs:\n  - job_name: membroker\n"
            f"    static_configs:\n      - targets: [{json.dumps(target)}]\n"
        )
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        with open(tmp_path / "prometheus.log", "wb") as log:
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # The first sample takes ~6 s even at a 1 s interval: poll for up to 15 s.
        deadline = time.monotonic() + 15
        result: list[Any] = []
        while time.monotonic() < deadline and prom.poll() is None:
            try:
                result = _api(base, "/api/v1/query", query='up{job="membroker"} == 1')["data"][
                    "result"
                ]
            except OSError:
                result = []
            if result:
                break
            time.sleep(0.5)
        log_text = (tmp_path / "prometheus.log").read_text(errors="replace")
        assert result, f'no sample of up{{job="membroker"}} within 15 s:\n{log_text}'
        assert result[0]["metric"]["instance"] == target

        sessions = _api(base, "/api/v1/query", query="membroker_sessions")["data"]["result"]
        assert [r["value"][1] for r in sessions] == ["0"], sessions

        groups = _api(base, "/api/v1/rules")["data"]["groups"]
        names = {g["name"]: [r["name"] for r in g["rules"]] for g in groups}
        assert "MembrokerDown" in names.get("membroker.alerts", []), names
        assert "membroker:revoke_latency_seconds:p99_5m" in names.get("membroker.recording", []), (
            names
        )
        assert all(r["health"] != "err" for g in groups for r in g["rules"]), groups
    finally:
        if prom is not None and prom.poll() is None:
            os.kill(prom.pid, signal.SIGTERM)
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(prom.pid, signal.SIGKILL)
                prom.wait(5)
        rc = d.stop()
    assert rc == 0, d.log()
