"""Spaces: imports (validated, sealed), layouts, ephemeral spaces, shutdown, the CLI."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import membroker
from membroker._sys import kvm as sys_kvm
from membroker._sys import memfd as sys_memfd

MiB = 1 << 20
PAGE = 4096
GMEM_OK, GMEM_WHY = sys_kvm.guest_memfd_support()


@pytest.fixture
def owner(daemon):
    with membroker.connect("vmm", daemon.runtime_dir) as session:
        yield session


def test_import_of_an_unsealed_memfd_seals_it_and_shares_the_same_pages(owner, clients):
    fd = os.memfd_create("vmm-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2 * MiB)
    os.pwrite(fd, b"imported!", 0x3000)
    try:
        space = owner.import_space(fd, name="ram", expected_size=2 * MiB)
        assert space.fd is None and space.info.imported and space.info.backing == "memfd"
        seals = fcntl.fcntl(fd, sys_memfd.F_GET_SEALS)
        assert seals & (sys_memfd.F_SEAL_SHRINK | sys_memfd.F_SEAL_GROW) == (
            sys_memfd.F_SEAL_SHRINK | sys_memfd.F_SEAL_GROW
        )
        with pytest.raises(PermissionError):
            os.ftruncate(fd, MiB)
        space.share(0, MiB)
        space.grant("backend", 0, MiB, "ro")
        backend = clients("backend")
        backend.ok("attach_va", space=space.space_id)
        assert (
            bytes.fromhex(backend.ok("read", space=space.space_id, offset=0x3000, length=9)["data"])
            == b"imported!"
        )
    finally:
        os.close(fd)


def test_imports_that_cannot_be_trusted_are_refused_and_leak_nothing(owner, daemon):
    owner.ping()
    baseline = daemon.open_fds()
    r, w = os.pipe()
    locked = os.memfd_create("locked", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(locked, MiB)
    fcntl.fcntl(locked, sys_memfd.F_ADD_SEALS, sys_memfd.F_SEAL_SEAL)
    rw = os.memfd_create("rw", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(rw, MiB)
    ro = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
    odd = os.memfd_create("odd", os.MFD_CLOEXEC)
    os.ftruncate(odd, MiB + 1)
    cases = [
        (r, "not a memfd or guest_memfd"),
        (locked, "seals are locked"),
        (ro, "read-write"),
        (odd, "not a positive multiple"),
    ]
    try:
        for fd, message in cases:
            with pytest.raises(membroker.InvalidArgument, match=message):
                owner.import_space(fd)
        with pytest.raises(membroker.InvalidArgument, match="expected 4096"):
            owner.import_space(rw, expected_size=PAGE)
        assert owner.list_spaces() == []
        # A refused import changes nothing, not even the seals of the owner's memfd.
        assert fcntl.fcntl(rw, sys_memfd.F_GET_SEALS) == 0
    finally:
        for fd in (r, w, locked, rw, ro, odd):
            os.close(fd)
    # Refused fds stay offered until the session ends; ending it releases them.
    owner.close()
    deadline = time.monotonic() + 5
    while daemon.open_fds() > baseline - 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert daemon.open_fds() <= baseline - 1  # the owner's own session socket is gone too


@pytest.mark.skipif(not GMEM_OK, reason=GMEM_WHY)
def test_import_of_the_vmms_own_guest_memfd(owner, clients):
    kvm = sys_kvm.open_kvm()
    vm = sys_kvm.create_vm(kvm)
    gmem = sys_kvm.create_guest_memfd(
        vm, 2 * MiB, sys_kvm.GUEST_MEMFD_FLAG_MMAP | sys_kvm.GUEST_MEMFD_FLAG_INIT_SHARED
    )
    try:
        space = owner.import_space(gmem, name="vm0")
        assert space.info.backing == "guest_memfd" and space.size == 2 * MiB
        from membroker._sys.mman import PROT_READ, PROT_WRITE, Mapping

        with Mapping.map_shared(gmem, 2 * MiB, PROT_READ | PROT_WRITE) as mem:
            mem.write(0x5000, b"gmem")
            space.share(0x5000, PAGE)
            space.grant("backend", 0x5000, PAGE)
            backend = clients("backend")
            backend.ok("attach_va", space=space.space_id)
            got = backend.ok("read", space=space.space_id, offset=0x5000, length=4)["data"]
            assert bytes.fromhex(got) == b"gmem"
    finally:
        for fd in (gmem, vm, kvm):
            os.close(fd)


def test_layout_regions_map_guest_addresses(owner):
    regions = [
        membroker.Region(gpa=0, offset=0, size=MiB),
        membroker.Region(gpa=0x100000000, offset=MiB, size=MiB),
    ]
    space = owner.create_space(2 * MiB, regions=regions)
    info = owner.get_space(space.space_id)
    assert info.regions == tuple(regions)
    assert info.gpa_to_offset(0x100000000 + 0x2000) == MiB + 0x2000
    with pytest.raises(ValueError, match="in no region"):
        info.gpa_to_offset(MiB)
    space.close()


def test_ephemeral_space_goes_with_its_owner_session(daemon, clients):
    with membroker.connect("watcher", daemon.runtime_dir) as watcher:
        owner = membroker.connect("vmm", daemon.runtime_dir)
        eph = owner.create_space(MiB, ephemeral=True)
        kept = owner.create_space(MiB)
        eph.share(0, MiB)
        eph.grant("backend", 0, MiB)
        backend = clients("backend")
        backend.ok("attach_va", space=eph.space_id)
        eph.close()
        kept.close()
        owner.close()
        deadline = time.monotonic() + 5
        while len(watcher.list_spaces()) > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [s.space_id for s in watcher.list_spaces()] == [kept.space_id]
        # The attached backend was revoked before the space went away.
        assert backend.ok("ranges", space=eph.space_id)["ranges"] == []
        # A new session under the owner's name manages the space that outlived the old one.
        with membroker.connect("vmm", daemon.runtime_dir) as again:
            again.space(kept.space_id).share(0, PAGE)
            assert again.get_space(kept.space_id).shared_bytes == PAGE


def test_space_limit_is_named(tmp_path):
    from tests.conftest import Daemon

    d = Daemon(tmp_path / "rt", env=None)
    try:
        os.environ["MEMBROKER_MAX_SPACES"] = "1"
    finally:
        del os.environ["MEMBROKER_MAX_SPACES"]
    d.stop()
    env = dict(
        os.environ,
        MEMBROKER_MAX_SPACES="1",
        PYTHONPATH=f"{Path(__file__).parents[2] / 'clients'}:"
        f"{Path(__file__).parents[2] / 'broker'}",
    )
    d = Daemon(tmp_path / "rt2", env=env)
    try:
        with membroker.connect("vmm", d.runtime_dir) as s:
            s.create_space(MiB).close()
            with pytest.raises(membroker.ResourceExhausted, match="max_spaces = 1"):
                s.create_space(MiB)
    finally:
        assert d.stop() == 0


def test_shutdown_tells_sessions_and_removes_sockets(tmp_path):
    from tests.conftest import Daemon

    d = Daemon(tmp_path / "rt")
    session = membroker.connect("vmm", d.runtime_dir)
    assert d.stop() == 0
    deadline = time.monotonic() + 5
    while not session.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.closed
    with pytest.raises(membroker.SessionClosed, match="broker shutting down"):
        session.list_spaces()
    session.close()
    assert sorted(p.name for p in d.runtime_dir.iterdir()) == []


def _ctl(daemon, *args: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root / 'clients'}:{root / 'broker'}")
    return subprocess.run(
        [sys.executable, "-m", "membroker.ctl", "--runtime-dir", str(daemon.runtime_dir), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_membrokerctl_tables_json_and_errors(daemon, clients):
    created = _ctl(daemon, "--json", "create-space", "--size", "4M", "--space-name", "g0")
    assert created.returncode == 0, created.stderr
    space_id = json.loads(created.stdout)["space_id"]
    assert _ctl(daemon, "share", space_id, "0", "1M").returncode == 0
    granted = _ctl(daemon, "grant", space_id, "backend", "0x0", "64K", "--access", "ro")
    assert granted.stdout.startswith(f"granted backend ro 0x0+64K on {space_id}")
    backend = clients("backend")
    backend.ok("attach_va", space=space_id)
    listing = _ctl(daemon, "spaces").stdout.splitlines()
    assert listing[0].split() == [
        "SPACE",
        "NAME",
        "BACKING",
        "SIZE",
        "SHARED",
        "OWNER",
        "SEQ",
        "ATTACHED",
        "GRANTEES",
    ]
    assert listing[1].split() == [
        space_id,
        "g0",
        "memfd",
        "4M",
        "1M",
        "membrokerctl",
        "2",
        "1",
        "1",
    ]
    sessions = _ctl(daemon, "sessions").stdout
    assert "backend" in sessions and str(backend.pid) in sessions
    revoked = _ctl(daemon, "revoke", space_id, "backend", "0", "64K")
    assert revoked.returncode == 0
    assert f"space {space_id} seq 3 (revoke): 64K revoked" in revoked.stdout
    assert "backend" in revoked.stdout and "acked" in revoked.stdout
    history = _ctl(daemon, "revocations", space_id)
    assert history.returncode == 0
    assert history.stdout.startswith(f"space {space_id} seq 3 (revoke): 64K revoked")
    assert history.stdout.splitlines()[1].split()[:5] == [
        "CLIENT",
        "SESSION",
        "PID",
        "OUTCOME",
        "FENCE",
    ]
    assert (
        json.loads(_ctl(daemon, "--json", "revocations", space_id, "--after-seq", "3").stdout) == []
    )
    stats = json.loads(_ctl(daemon, "--json", "stats").stdout)
    assert stats["spaces"] == 1 and stats["revocations_total"] == 1

    bad = _ctl(daemon, "grant", space_id, "backend", "0", "12x")
    assert bad.returncode == 2 and "'12x' is not a size" in bad.stderr
    missing = _ctl(daemon, "delete-space", "sp-00000000")
    assert missing.returncode == 1 and "no space 'sp-00000000'" in missing.stderr
    foreign = _ctl(daemon, "--name", "someone-else", "revoke", space_id, "backend", "0", "4K")
    assert foreign.returncode == 1 and "not the owner" in foreign.stderr
    deleted = _ctl(daemon, "delete-space", space_id)
    assert deleted.returncode == 0 and "acked" in deleted.stdout
