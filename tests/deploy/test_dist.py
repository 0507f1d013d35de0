"""The install story: `make dist`'s wheel and sdist, installed into a fresh virtualenv away from
the source tree, give working console scripts, importable packages and a daemon that serves.

The wheel is built with the same command as `make dist` (`python -m build`, which builds the sdist
and then the wheel from it), into a temporary directory. The virtualenv has no system site
packages; pip resolves the runtime dependencies from the configured indexes (its cache makes that a
few seconds). Nothing from this checkout is on the installed daemon's path.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from deploy_helpers import ROOT, Daemon
from grpc_health.v1 import health_pb2, health_pb2_grpc

from membrokerd import __version__

# Cold pip caches download grpcio and friends; the per-test default (120 s) covers a warm run.
pytestmark = pytest.mark.timeout(600)

PACKAGES = {
    "membroker": ROOT / "clients" / "membroker",
    "membrokerd": ROOT / "broker" / "membrokerd",
}


def _run(
    argv: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{argv}: rc {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def _clean_env() -> dict[str, str]:
    """The caller's environment without anything that points into this checkout or the daemon."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MEMBROKER_", "PYTHON", "VIRTUAL_ENV")) and k != "NOTIFY_SOCKET"
    }
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", os.defpath).split(os.pathsep) if not p.startswith(str(ROOT))
    )
    return env


@dataclass
class Dist:
    wheel: Path
    sdist: Path
    seconds: float


@dataclass
class Installed:
    venv: Path
    home: Path  # a working directory outside the source tree
    seconds: float

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    t0 = time.monotonic()
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=ROOT)
    seconds = time.monotonic() - t0
    print(f"python -m build: {seconds:.1f} s")
    wheels = list(out.glob("membroker-*.whl"))
    sdists = list(out.glob("membroker-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
    return Dist(wheels[0], sdists[0], seconds)


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("installed")
    venv, home = base / "venv", base / "home"
    home.mkdir()
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)], cwd=home, env=_clean_env())
    _run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(dist.wheel)],
        cwd=home,
        env=_clean_env(),
    )
    seconds = time.monotonic() - t0
    print(f"venv + pip install of the wheel: {seconds:.1f} s")
    return Installed(venv, home, seconds)


def _source_files(package: str) -> set[str]:
    """Every module, stub and marker of a package in the source tree, as wheel paths."""
    root = PACKAGES[package]
    return {
        f"{package}/{p.relative_to(root).as_posix()}"
        for p in root.rglob("*")
        if p.suffix in (".py", ".pyi", ".typed") and "__pycache__" not in p.parts
    }


def test_wheel_holds_daemon_sdk_generated_code_and_scripts(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
        info = f"membroker-{__version__}.dist-info"
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        metadata = wheel.read(f"{info}/METADATA").decode()
    for package in PACKAGES:
        missing = _source_files(package) - names
        assert not missing, f"not in the wheel: {sorted(missing)}"
    for name in (
        "membroker/py.typed",
        "membroker/v1/broker_pb2.py",
        "membroker/v1/broker_pb2.pyi",
        "membroker/v1/broker_pb2_grpc.py",
        "membroker/v1/session_pb2.py",
        "membroker/v1/session_pb2.pyi",
        "membrokerd/__main__.py",
        "membrokerd/metrics.py",
    ):
        assert name in names, name
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
    assert dist.wheel.name == f"membroker-{__version__}-py3-none-any.whl"
    assert re.search(r"^membrokerd = membrokerd\.__main__:main$", entry_points, re.M)
    assert re.search(r"^membrokerctl = membroker\.ctl:main$", entry_points, re.M)
    assert re.search(rf"^Version: {re.escape(__version__)}$", metadata, re.M)
    # Runtime dependencies only: the test toolchain is an extra.
    requires = email.message_from_string(metadata).get_all("Requires-Dist") or []
    required = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in requires if ";" not in r}
    assert "prometheus-client" in required and "grpcio" in required, required
    assert not {"pytest", "mypy", "ruff", "grpcio-tools", "build"} & required, required


def test_sdist_builds_the_same_packages(dist: Dist) -> None:
    prefix = f"membroker-{__version__}/"
    with tarfile.open(dist.sdist) as sdist:
        names = {n.removeprefix(prefix) for n in sdist.getnames()}
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= names
    for package, root in PACKAGES.items():
        where = root.parent.name
        expected = {f"{where}/{n}" for n in _source_files(package)}
        assert not expected - names, sorted(expected - names)


def test_console_scripts_run(installed: Installed) -> None:
    out = _run([str(installed.bin / "membrokerd"), "--help"], cwd=installed.home, env=_clean_env())
    assert out.stdout.startswith("usage: membrokerd"), out.stdout
    assert "--metrics-address" in out.stdout
    out = _run(
        [str(installed.bin / "membrokerctl"), "--help"], cwd=installed.home, env=_clean_env()
    )
    assert out.stdout.startswith("usage: membrokerctl"), out.stdout


def test_packages_import_from_the_venv_not_the_checkout(installed: Installed) -> None:
    code = (
        "import membroker, membrokerd, membroker.v1.broker_pb2 as pb, pathlib\n"
        "print(membroker.__file__); print(membrokerd.__file__)\n"
        "print(pathlib.Path(membroker.__file__).with_name('py.typed').is_file())\n"
        "print(membrokerd.__version__)\n"
        "print(pb.DESCRIPTOR.services_by_name['MemBroker'].full_name)"
    )
    out = _run([str(installed.bin / "python"), "-c", code], cwd=installed.home, env=_clean_env())
    sdk, daemon, typed, version, service = out.stdout.split()
    site = installed.venv / "lib"
    assert Path(sdk).is_relative_to(site) and Path(daemon).is_relative_to(site), out.stdout
    assert (typed, version, service) == ("True", __version__, "membroker.v1.MemBroker")


@pytest.fixture
def installed_daemon(installed: Installed, tmp_path: Path) -> Iterator[Daemon]:
    # The installed console script, run outside this checkout.
    d = Daemon(
        tmp_path / "rt",
        command=[str(installed.bin / "membrokerd")],
        cwd=installed.home,
        env=_clean_env(),
        ready_timeout=30.0,
    )
    try:
        yield d
    finally:
        rc = d.stop()
    assert rc == 0, d.log()
    assert not (d.runtime_dir / "control.sock").exists()
    assert not (d.runtime_dir / "session.sock").exists()


def test_installed_daemon_answers_health_sdk_and_metrics(
    installed: Installed, installed_daemon: Daemon
) -> None:
    # The daemon runs the wheel's code, not this checkout's.
    exe = os.readlink(f"/proc/{installed_daemon.pid}/exe")
    cmdline = Path(f"/proc/{installed_daemon.pid}/cmdline").read_bytes().split(b"\0")
    assert str(installed.bin / "membrokerd") in {a.decode() for a in cmdline}, cmdline
    assert not exe.startswith(str(ROOT)), exe

    control = installed_daemon.runtime_dir / "control.sock"
    with grpc.insecure_channel(f"unix:{control}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "membroker.v1.MemBroker"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service

    # The installed SDK over both sockets: a session (session.sock), control calls, an fd.
    ctl = [str(installed.bin / "membrokerctl"), "--runtime-dir", str(installed_daemon.runtime_dir)]
    space = _run(
        [*ctl, "create-space", "--size", "4M", "-q"], cwd=installed.home, env=_clean_env()
    ).stdout.strip()
    assert space, "create-space printed no id"
    listed = _run([*ctl, "spaces"], cwd=installed.home, env=_clean_env()).stdout
    assert space in listed, listed
    _run([*ctl, "delete-space", space], cwd=installed.home, env=_clean_env())

    with urllib.request.urlopen(installed_daemon.metrics_url, timeout=10) as resp:
        body = resp.read().decode()
    assert re.search(
        rf'^membroker_build_info\{{.*version="{re.escape(__version__)}".*\}} 1\.0$', body, re.M
    ), body
    assert re.search(r"^process_resident_memory_bytes \S+$", body, re.M)
