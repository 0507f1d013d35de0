"""The sidecar image for real: built from deploy/Containerfile with podman, run, used and refused.

What runs here, all with podman (runc, --network=none, storage of its own in /tmp/mbpod-PID,
every container, image, mount and directory it made removed at the end):
- a base image: a minimal Debian 12 root file system made by mmdebstrap (python3, python3-venv,
  libstdc++6 for grpcio), cached as a tarball in /var/cache/membroker-test (about 30 s to make,
  keyed by its package list and apt sources), imported with `podman import`;
- the membrokerd image: `podman build --network=none --format docker` of deploy/Containerfile,
  with the wheel of this checkout and its dependencies in a local wheelhouse (`python -m build`,
  then `pip wheel`), installed with --no-index;
- the daemon container, as deploy/kubernetes/membrokerd-sidecar.yaml runs it: root with only
  CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_KILL, no-new-privileges, a read-only root, the
  pod's ConfigMap as its configuration, a host temp directory as /run/membroker; its
  HEALTHCHECK (`podman healthcheck run`) must say healthy;
- an owner ("vmm", uid 1000) and a backend (uid 1001), each in a container of its own that
  shares the socket directory and the daemon's PID namespace (`--pid=container:DAEMON`, the
  podman twin of a pod's shareProcessNamespace): the backend attaches, reads the guest's bytes,
  writes some, and the owner's revoke reports it acked and verified;
- a client in a container of its own PID namespace: refused, with the message that names the
  namespace problem and its two fixes (membrokerd.pidns);
- the daemon as the clients' own uid with no capability at all (the Containerfile's
  alternative), and sealed VA mode across containers (seccomp relaxed, CAP_SYS_PTRACE in the
  client: what it takes, README "Containers and Kubernetes").

Skips (with the reason) only where podman cannot run at all: not root, or a tool missing
(`make test` installs them from deploy/test-packages.txt).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, ROOT, require_tool

# A cold run (mmdebstrap, pip downloads) takes a minute or two; the per-test default is 120 s.
pytestmark = pytest.mark.timeout(600)

CACHE = Path(os.environ.get("MEMBROKER_TEST_CACHE", "/var/cache/membroker-test"))
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "libstdc++6")
BASE_TAG = "localhost/membroker-base:bookworm"
IMAGE_TAG = "localhost/membrokerd:test"
# The podman twins of the daemon's securityContext in deploy/kubernetes/.
LIMITS = ("--ulimit", "nofile=16384:16384", "--ulimit", "nproc=32768:32768")
DAEMON_CAPS = ("--cap-drop=all", "--cap-add=sys_ptrace,dac_read_search,kill")
# CAP_DAC_READ_SEARCH (2), CAP_KILL (5), CAP_SYS_PTRACE (19)
DAEMON_CAP_MASK = (1 << 2) | (1 << 5) | (1 << 19)
# The users of deploy/kubernetes/membrokerd-sidecar.yaml's VMM and backend containers.
VMM_USER = "1000:1000"
BACKEND_USER = "1001:1001"
SIDECAR_POD = DEPLOY / "kubernetes" / "membrokerd-sidecar.yaml"


def _apt_sources() -> Path | None:
    """The host's Debian sources (same mirror, same snapshot) for mmdebstrap, if it has them."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if path.exists() and SUITE in path.read_text():
            return path
    return None


def base_rootfs() -> Path:
    """The cached base root file system tarball, made by mmdebstrap when missing."""
    mmdebstrap = require_tool("mmdebstrap")
    sources = _apt_sources()
    key = hashlib.sha256(
        repr((SUITE, BASE_PACKAGES, sources.read_text() if sources else "")).encode()
    ).hexdigest()[:16]
    tarball = CACHE / f"rootfs-{SUITE}-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    # mmdebstrap picks its output format by the name's extension.
    partial = tarball.with_name(f".{tarball.stem}.{os.getpid()}.tar")
    argv = [
        mmdebstrap,
        "--mode=root",
        "--variant=essential",
        f"--include={','.join(BASE_PACKAGES)}",
        # Nobody reads documentation in a sidecar; 20 MB less to import.
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        SUITE,
        str(partial),
    ]
    if sources is not None:
        argv.append(str(sources))
    try:
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=480
        )
        assert result.returncode == 0, f"mmdebstrap failed:\n{result.stderr[-4000:]}"
        partial.rename(tarball)
    finally:
        partial.unlink(missing_ok=True)
    return tarball


@dataclass
class Podman:
    """podman with storage of its own under `base`; remembers what it created, to remove it."""

    base: Path
    exe: str
    runtime: str
    containers: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    # podman as root keeps a blob-info cache in /var/lib/containers/cache whatever --root says:
    # removed at the end when this run created it.
    system_cache: Path = Path("/var/lib/containers")
    system_cache_existed: bool = field(init=False)

    def __post_init__(self) -> None:
        self.system_cache_existed = self.system_cache.exists()

    def argv(self, *args: str) -> list[str]:
        b = self.base
        return [
            self.exe,
            f"--root={b / 'root'}",
            f"--runroot={b / 'runroot'}",
            f"--tmpdir={b / 'libpod'}",
            f"--volumepath={b / 'volumes'}",
            f"--network-config-dir={b / 'networks'}",
            f"--runtime={self.runtime}",
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
            *args,
        ]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, TMPDIR=str(self.base / "tmp"))
        result = subprocess.run(
            self.argv(*args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)}: rc {result.returncode}\n{result.stdout}\n"
                f"{result.stderr[-4000:]}"
            )
        return result

    def run(self, name: str, *args: str, **kw: float) -> subprocess.CompletedProcess[str]:
        """`podman run --name NAME --network=none ...`, remembered for removal."""
        self.containers.append(name)
        return self("run", "--name", name, "--network=none", "--pull=never", *LIMITS, *args, **kw)

    def logs(self, name: str) -> str:
        result = self("logs", name, check=False)
        return result.stdout + result.stderr

    def close(self) -> None:
        """Removes what it created (by name and id), then its storage, mounts included."""
        for name in reversed(self.containers):
            self("rm", "--force", "--time=5", "--ignore", name, check=False)
        for image in reversed(self.images):
            self("rmi", "--force", image, check=False)
        # containers/storage leaves its overlay directory bind-mounted on itself (and, after a
        # failure, container mounts): unmount whatever is under our storage, deepest first.
        root = str(self.base) + "/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted((p for p in points if p.startswith(root)), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        if not self.system_cache_existed:
            shutil.rmtree(self.system_cache, ignore_errors=True)


@dataclass
class Built:
    podman: Podman
    image: str
    seconds: dict[str, float]


def _timed(seconds: dict[str, float], what: str, start: float) -> None:
    seconds[what] = round(time.monotonic() - start, 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if os.geteuid() != 0:
        pytest.skip("needs root: podman with runc as root, and mmdebstrap --mode=root")
    exe = require_tool("podman")
    runtime = require_tool("runc")
    require_tool("mmdebstrap")
    seconds: dict[str, float] = {}
    t = time.monotonic()
    rootfs = base_rootfs()
    _timed(seconds, "base rootfs", t)

    work = tmp_path_factory.mktemp("container")
    # Short paths: podman's runroot holds Unix sockets (conmon's attach socket, 108 bytes max).
    podman = Podman(Path(f"/tmp/mbpod-{os.getpid()}"), exe, runtime)
    try:
        for d in ("root", "runroot", "libpod", "volumes", "networks", "tmp"):
            (podman.base / d).mkdir(parents=True, exist_ok=True)
        t = time.monotonic()
        base_id = podman("import", str(rootfs), BASE_TAG).stdout.strip().splitlines()[-1]
        podman.images.append(base_id)
        _timed(seconds, "import", t)

        # The build context as the repository would give it through .containerignore: the
        # Containerfile, the example configuration and a wheelhouse, nothing else.
        t = time.monotonic()
        context = work / "context"
        (context / "deploy").mkdir(parents=True)
        shutil.copy(DEPLOY / "Containerfile", context / "deploy")
        shutil.copy(DEPLOY / "membrokerd.toml", context / "deploy")
        shutil.copy(ROOT / ".containerignore", context)
        dist = work / "dist"
        build = subprocess.run(
            [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-4000:]
        (wheel,) = dist.glob("membroker-*.whl")
        wheels = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--wheel-dir",
                str(context / "dist" / "wheels"),
                str(wheel),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert wheels.returncode == 0, wheels.stdout[-2000:] + wheels.stderr[-4000:]
        _timed(seconds, "wheelhouse", t)

        t = time.monotonic()
        podman(
            "build",
            "--network=none",
            "--pull=never",
            "--format=docker",
            *LIMITS,
            "--file",
            str(context / "deploy" / "Containerfile"),
            "--tag",
            IMAGE_TAG,
            str(context),
            timeout=300,
        )
        podman.images.append(IMAGE_TAG)
        _timed(seconds, "image build", t)
        yield Built(podman, IMAGE_TAG, seconds)
    finally:
        podman.close()


@dataclass
class Sidecar:
    """A daemon container and the directories its clients share with it."""

    built: Built
    name: str
    run_dir: Path
    shared: Path

    def client(
        self, name: str, user: str, script: str, *extra: str, detach: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Runs `script` (in /shared) with the image's Python as `user`, in a container of its
        own that shares the socket directory; `extra` adds e.g. --pid=container:DAEMON."""
        return self.built.podman.run(
            name,
            *(["--detach"] if detach else []),
            f"--user={user}",
            "--cap-drop=all",
            "--security-opt=no-new-privileges",
            "--health-interval=disable",
            f"--volume={self.run_dir}:/run/membroker",
            f"--volume={self.shared}:/shared",
            "--entrypoint=/opt/membroker/bin/python",
            *extra,
            self.built.image,
            f"/shared/{script}",
            timeout=90,
        )

    def owner_and_backend(
        self, tag: str, vmm_user: str, backend_user: str, *backend_extra: str
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """An owner and a backend, each in its own container in the daemon's PID namespace:
        the backend attaches, reads, writes and is revoked. (attached, report, backend_done)."""
        podman = self.built.podman
        same_ns = f"--pid=container:{self.name}"
        vmm = f"mbtest-{os.getpid()}-{tag}-vmm"
        self.client(vmm, vmm_user, "owner.py", same_ns, detach=True)
        backend = self.client(
            f"mbtest-{os.getpid()}-{tag}-backend",
            backend_user,
            "backend.py",
            same_ns,
            *backend_extra,
        )
        assert backend.returncode == 0, backend.stderr + podman.logs(self.name)
        waited = podman("wait", vmm, timeout=60).stdout.strip().splitlines()
        assert waited[-1] == "0", podman.logs(vmm) + podman.logs(self.name)
        return tuple(  # type: ignore[return-value]
            json.loads((self.shared / f).read_text())
            for f in ("attached.json", "report.json", "backend_done.json")
        )


# Files in /shared, shared by the test and the client containers.
_COMMON = textwrap.dedent(
    """
    import json, os, time
    def put(name, obj):
        with open(f"/shared/.{name}", "w") as f:
            json.dump(obj, f)
        os.rename(f"/shared/.{name}", f"/shared/{name}")
    def wait(name, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with open(f"/shared/{name}") as f:
                    return json.load(f)
            except FileNotFoundError:
                time.sleep(0.02)
        raise TimeoutError(f"/shared/{name} did not appear")
    """
)

_OWNER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, "/shared")
    import membroker
    from common import put, wait
    with membroker.connect("vmm") as vmm:
        space = vmm.create_space(4 << 20, name="guest0")
        mem = space.map()
        mem.write(0x1000, b"hello from the guest")
        space.share(0, 1 << 20)
        space.grant("backend", 0, 64 << 10, "rw")
        put("space.json", {"space_id": space.space_id, "pid": os.getpid()})
        wait("attached.json")
        report = space.revoke("backend", 0, 64 << 10)
        put("report.json", {
            "backend_wrote": mem.read(0x2000, 22).decode(),
            "clients": [
                {"client": c.client, "pid": c.pid, "outcome": c.outcome, "fence": c.fence,
                 "reason": c.reason, "latency_us": c.latency_us}
                for c in report.clients
            ],
        })
        wait("backend_done.json")
        mem.close()
        space.delete()
    """
)

_BACKEND = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, "/shared")
    import membroker
    from common import put, wait
    space_id = wait("space.json")["space_id"]
    with membroker.connect("backend") as session:
        backend = session.attach_va(space_id)
        data = backend.read(0x1000, 20)
        backend.write(0x2000, b"written by the backend")
        put("attached.json", {"mode": backend.mode, "read": data.decode(), "pid": os.getpid()})
        wait("report.json")
        put("backend_done.json", {"holds_after": backend.holds(0x1000, 1)})
        backend.close()
    """
)

_OUTSIDER = textwrap.dedent(
    """
    import json
    import membroker
    try:
        with membroker.connect("outsider") as session:
            print(json.dumps({"connected": True}))
    except membroker.MembrokerError as exc:
        print(json.dumps({"connected": False, "type": type(exc).__name__, "error": str(exc)}))
    """
)


def start_sidecar(built: Built, base: Path, tag: str, *daemon_args: str, owner: int = 0) -> Sidecar:
    """A daemon container (the image's entrypoint) with `daemon_args`, a 0755 socket directory
    owned by `owner` (as the pod's init container leaves it) and a shared scratch directory."""
    run_dir = base / "run"
    run_dir.mkdir(mode=0o755)
    run_dir.chmod(0o755)  # whatever the umask: the daemon refuses a group/other-writable dir
    os.chown(run_dir, owner, owner)
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # the clients run as the pod's users, not root
    for name, text in (
        ("common.py", _COMMON),
        ("owner.py", _OWNER),
        ("backend.py", _BACKEND),
        ("outsider.py", _OUTSIDER),
    ):
        (shared / name).write_text(text)
    name = f"mbtest-{os.getpid()}-{tag}"
    podman = built.podman
    podman.run(
        name,
        "--detach",
        "--security-opt=no-new-privileges",
        "--read-only",
        # No systemd here to run the health timer; `podman healthcheck run` runs it on demand.
        "--health-interval=disable",
        f"--volume={run_dir}:/run/membroker",
        *daemon_args,
        built.image,
    )
    deadline = time.monotonic() + 30
    while not (run_dir / "session.sock").exists():
        state = podman("inspect", "--format={{.State.Status}}", name).stdout.strip()
        assert state == "running" and time.monotonic() < deadline, podman.logs(name)
        time.sleep(0.1)
    return Sidecar(built, name, run_dir, shared)


@pytest.fixture(scope="module")
def sidecar(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """The daemon as deploy/kubernetes/membrokerd-sidecar.yaml runs it: root with three
    capabilities, read-only root, the pod's ConfigMap as its configuration."""
    base = tmp_path_factory.mktemp("sidecar")
    (config_map,) = [
        doc for doc in yaml.safe_load_all(SIDECAR_POD.read_text()) if doc["kind"] == "ConfigMap"
    ]
    config_dir = base / "config"
    config_dir.mkdir()
    (config_dir / "membrokerd.toml").write_text(config_map["data"]["membrokerd.toml"])
    sidecar = start_sidecar(
        built, base, "daemon", *DAEMON_CAPS, f"--volume={config_dir}:/etc/membroker:ro"
    )
    yield sidecar
    built.podman("stop", "--time=10", sidecar.name, check=False)


def test_image_is_healthy_with_only_its_capabilities(sidecar: Sidecar) -> None:
    podman = sidecar.built.podman
    deadline = time.monotonic() + 30
    while True:
        check = podman("healthcheck", "run", sidecar.name, check=False)
        if check.returncode == 0:
            break
        assert time.monotonic() < deadline, check.stdout + check.stderr + podman.logs(sidecar.name)
        time.sleep(0.5)
    health = podman("inspect", "--format={{json .State.Health}}", sidecar.name).stdout
    assert json.loads(health)["Status"] == "healthy", health
    image = json.loads(podman("image", "inspect", sidecar.built.image).stdout)[0]
    assert image["Healthcheck"]["Test"] == ["CMD", "/usr/local/bin/membrokerd-health"]
    assert image["Config"]["User"] == "0:0"
    assert image["Config"]["StopSignal"] == "SIGTERM"
    # The daemon (pid 1 of its container): exactly three capabilities, and no way to more.
    status = podman("exec", sidecar.name, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert int(fields[key], 16) == DAEMON_CAP_MASK, (key, fields[key])
    assert fields["NoNewPrivs"].strip() == "1"
    # The health command says why when the daemon is not there.
    missing = podman(
        "exec", sidecar.name, "/usr/local/bin/membrokerd-health", "/nonexistent", check=False
    )
    assert missing.returncode != 0 and "UNAVAILABLE" in missing.stderr, missing


def test_client_sharing_the_pid_namespace_attaches_and_is_revoked(sidecar: Sidecar) -> None:
    attached, report, done = sidecar.owner_and_backend("pod", VMM_USER, BACKEND_USER)
    assert attached["read"] == "hello from the guest"
    assert report["backend_wrote"] == "written by the backend"  # same pages, across containers
    # The container runtime's default seccomp profile refuses userfaultfd (and mseal): the SDK
    # falls back to cooperative mode there (README: "Containers and Kubernetes").
    assert attached["mode"] in ("cooperative", "sealed")
    (outcome,) = report["clients"]
    assert outcome["client"] == "backend"
    assert outcome["pid"] == attached["pid"] > 0  # seen in the daemon's namespace: verifiable
    assert outcome["outcome"] in ("acked", "enforced"), outcome
    assert outcome["fence"] == "", outcome
    assert done["holds_after"] is False
    # Another user than the daemon's, verified all the same (CAP_SYS_PTRACE, DAC_READ_SEARCH).
    log = sidecar.built.podman.logs(sidecar.name)
    uid = BACKEND_USER.split(":")[0]
    assert f"client 'backend' pid {attached['pid']} uid {uid}" in log, log


def test_client_in_another_pid_namespace_is_refused_clearly(sidecar: Sidecar) -> None:
    result = sidecar.client(f"mbtest-{os.getpid()}-outsider", BACKEND_USER, "outsider.py")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["connected"] is False, answer
    error = answer["error"]
    print("the refusal:", error)
    assert "another PID namespace" in error, error
    for fix in ("shareProcessNamespace: true", "--pid=container:", "hostPID: true", "--pid=host"):
        assert fix in error, error
    log = sidecar.built.podman.logs(sidecar.name)
    assert "another PID namespace" in log, log


def test_daemon_stops_cleanly(sidecar: Sidecar) -> None:
    """SIGTERM (the image's STOPSIGNAL) ends the daemon with status 0, sockets removed."""
    podman = sidecar.built.podman
    podman("stop", "--time=10", sidecar.name)
    code = podman("inspect", "--format={{.State.ExitCode}}", sidecar.name).stdout.strip()
    assert code == "0", podman.logs(sidecar.name)
    assert not (sidecar.run_dir / "session.sock").exists()
    assert not (sidecar.run_dir / "control.sock").exists()


def test_same_uid_daemon_needs_no_capability(
    built: Built, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Where every client runs as one uid, the daemon can too, with no capability at all."""
    user = VMM_USER
    uid = int(user.split(":")[0])
    sidecar = start_sidecar(
        built,
        tmp_path_factory.mktemp("same-uid"),
        "same-uid",
        "--cap-drop=all",
        f"--user={user}",
        owner=uid,
    )
    try:
        status = built.podman("exec", sidecar.name, "cat", "/proc/1/status").stdout
        assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(
            r"^CapBnd:\s+0+$", status, re.M
        ), status
        attached, report, done = sidecar.owner_and_backend("same-uid", user, user)
        assert attached["read"] == "hello from the guest"
        (outcome,) = report["clients"]
        assert outcome["outcome"] in ("acked", "enforced") and outcome["fence"] == "", outcome
        assert done["holds_after"] is False
    finally:
        built.podman("stop", "--time=10", sidecar.name, check=False)


def test_sealed_mode_across_containers(
    built: Built, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Sealed VA mode works across containers once seccomp lets userfaultfd and mseal through
    (the runtime's default profile refuses both) and the client holds CAP_SYS_PTRACE (the SDK
    asks userfaultfd for fork events, which the kernel grants only with it): README,
    "Containers and Kubernetes"."""
    unconfined = "--security-opt=seccomp=unconfined"
    sidecar = start_sidecar(
        built, tmp_path_factory.mktemp("sealed"), "sealed", *DAEMON_CAPS, unconfined
    )
    try:
        attached, report, done = sidecar.owner_and_backend(
            "sealed", "0:0", "0:0", unconfined, "--cap-add=sys_ptrace"
        )
        assert attached["mode"] == "sealed", attached
        assert attached["read"] == "hello from the guest"
        assert report["backend_wrote"] == "written by the backend"
        (outcome,) = report["clients"]
        assert outcome["outcome"] in ("acked", "enforced") and outcome["fence"] == "", outcome
        assert done["holds_after"] is False
        assert "sealed mapping of" in built.podman.logs(sidecar.name)
    finally:
        built.podman("stop", "--time=10", sidecar.name, check=False)
    print("container test timings (s):", built.seconds)
