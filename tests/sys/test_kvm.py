"""guest_memfd backings via real KVM ioctls: create, map, pass by SCM_RIGHTS, private is SIGBUS."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
from collections.abc import Callable

import pytest

from membroker._sys import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    PAGE_SIZE,
    PROT_READ,
    PROT_WRITE,
    GuestMemfdFactory,
    Mapping,
    check_extension,
    create_guest_memfd,
    create_vm,
    describe_fd,
    guest_memfd_support,
    kvm,
    mapping_count_for_inode,
    open_fd_count,
    open_kvm,
    recv_with_fds,
    send_with_fds,
)

RW = PROT_READ | PROT_WRITE
SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
Child = Callable[[Callable[[], object]], int]


def test_ioctl_numbers_match_the_uapi_header() -> None:
    assert kvm.KVM_GET_API_VERSION == 0xAE00
    assert kvm.KVM_CREATE_VM == 0xAE01
    assert kvm.KVM_CHECK_EXTENSION == 0xAE03
    assert kvm.KVM_CREATE_GUEST_MEMFD == 0xC040AED4
    assert kvm._IOW(kvm.KVMIO, 0x46, 32) == 0x4020AE46  # KVM_SET_USER_MEMORY_REGION
    assert kvm._IOR(ord("f"), 17, 104) == 0x80686611
    assert kvm._IOWR(ord("f"), 17, 104) == 0xC0686611  # PROCMAP_QUERY
    assert (KVM_CAP_GUEST_MEMFD, KVM_CAP_GUEST_MEMFD_FLAGS) == (234, 244)
    with pytest.raises(ValueError):
        kvm._IOWR(kvm.KVMIO, 0x100, 8)
    with pytest.raises(ValueError):
        kvm._IOWR(kvm.KVMIO, 0, 1 << 14)


def test_support_probe_and_capabilities(guest_memfd_ok: None) -> None:
    supported, reason = guest_memfd_support()
    assert supported, reason
    kvm_fd = open_kvm()
    try:
        vm_fd = create_vm(kvm_fd)
        try:
            assert check_extension(vm_fd, KVM_CAP_GUEST_MEMFD) == 1
            assert check_extension(vm_fd, KVM_CAP_GUEST_MEMFD_FLAGS) & SHARED == SHARED
            assert fcntl.fcntl(vm_fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            os.close(vm_fd)
    finally:
        os.close(kvm_fd)


def test_create_map_read_write(gmem_factory: GuestMemfdFactory) -> None:
    fd = gmem_factory.create(4 * PAGE_SIZE)
    try:
        # the kernel hands it out without close-on-exec; we set it
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        st = os.fstat(fd)
        with Mapping.map_shared(fd, 4 * PAGE_SIZE, RW) as m:
            assert mapping_count_for_inode(os.getpid(), st.st_dev, st.st_ino) == 1
            assert m.read(0, 8) == bytes(8)  # INIT_SHARED memory starts zeroed
            m.write(3 * PAGE_SIZE, b"guest page")
            assert bytes(m.view(3 * PAGE_SIZE, 10)) == b"guest page"
        with Mapping.map_shared(fd, 4 * PAGE_SIZE, PROT_READ) as again:
            assert again.read(3 * PAGE_SIZE, 10) == b"guest page"
    finally:
        os.close(fd)


def test_no_read_write_syscalls(gmem_factory: GuestMemfdFactory) -> None:
    fd = gmem_factory.create(PAGE_SIZE)
    try:
        for call in (lambda: os.pread(fd, 1, 0), lambda: os.pwrite(fd, b"x", 0)):
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno == errno.ESPIPE
    finally:
        os.close(fd)


def test_passed_by_scm_rights_to_another_process(
    gmem_factory: GuestMemfdFactory, child: Child
) -> None:
    parent_end, child_end = socket.socketpair()
    with parent_end, child_end:

        def peer() -> None:
            parent_end.close()
            data, fds, truncated = recv_with_fds(child_end, 64)
            assert (data, len(fds), truncated) == (b"attach", 1, False)
            assert describe_fd(fds[0]).kind == "guest_memfd"
            with Mapping.map_shared(fds[0], 2 * PAGE_SIZE, RW) as m:
                assert m.read(PAGE_SIZE, 15) == b"from the owner\0"
                m.write(0, b"from the client")
            child_end.sendall(b"done")

        # Fork first: the child can only have the guest_memfd through SCM_RIGHTS.
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                peer()
                code = 0
            finally:
                os._exit(code)
        fd = gmem_factory.create(2 * PAGE_SIZE)
        try:
            with Mapping.map_shared(fd, 2 * PAGE_SIZE, RW) as m:
                m.write(PAGE_SIZE, b"from the owner")
                send_with_fds(parent_end, b"attach", [fd])
                assert parent_end.recv(4) == b"done"
                assert m.read(0, 15) == b"from the client"
        finally:
            os.close(fd)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_private_guest_memfd_touch_is_sigbus(guest_memfd_ok: None, child: Child) -> None:
    kvm_fd = open_kvm()
    vm_fd = create_vm(kvm_fd)
    fd = create_guest_memfd(vm_fd, 2 * PAGE_SIZE, GUEST_MEMFD_FLAG_MMAP)  # no INIT_SHARED
    try:
        with Mapping.map_shared(fd, 2 * PAGE_SIZE, RW) as m:  # mapping is allowed ...
            v = m.view(0, 2 * PAGE_SIZE)
            assert child(lambda: v[0]) == -signal.SIGBUS  # ... touching private memory is not
            assert child(lambda: m.write(PAGE_SIZE, b"x")) == -signal.SIGBUS
            v.release()
    finally:
        for x in (fd, vm_fd, kvm_fd):
            os.close(x)


def test_guest_memfd_without_mmap_flag_cannot_be_mapped(guest_memfd_ok: None) -> None:
    kvm_fd = open_kvm()
    vm_fd = create_vm(kvm_fd)
    fd = create_guest_memfd(vm_fd, PAGE_SIZE, 0)
    try:
        with pytest.raises(OSError) as exc:
            Mapping.map_shared(fd, PAGE_SIZE, PROT_READ)
        assert exc.value.errno == errno.ENODEV
    finally:
        for x in (fd, vm_fd, kvm_fd):
            os.close(x)


@pytest.mark.parametrize(
    ("size", "flags"),
    [
        (0, SHARED),
        (PAGE_SIZE + 1, SHARED),
        (PAGE_SIZE, 1 << 63),
        (PAGE_SIZE, 1 << 2),
        (-PAGE_SIZE, SHARED),
        (PAGE_SIZE, -1),
    ],
    ids=["size-zero", "size-unaligned", "flag-bit-63", "flag-unknown", "size-neg", "flags-neg"],
)
def test_create_guest_memfd_invalid_inputs(guest_memfd_ok: None, size: int, flags: int) -> None:
    kvm_fd = open_kvm()
    vm_fd = create_vm(kvm_fd)
    try:
        with pytest.raises(OSError) as exc:
            create_guest_memfd(vm_fd, size, flags)
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(vm_fd)
        os.close(kvm_fd)


def test_create_guest_memfd_on_wrong_fd(guest_memfd_ok: None) -> None:
    kvm_fd = open_kvm()
    memfd = os.memfd_create("not-a-vm", os.MFD_CLOEXEC)
    try:
        for fd, err in ((kvm_fd, errno.EINVAL), (memfd, errno.ENOTTY), (-1, errno.EBADF)):
            with pytest.raises(OSError) as exc:
                create_guest_memfd(fd, PAGE_SIZE, SHARED)
            assert exc.value.errno == err, fd
    finally:
        os.close(memfd)
        os.close(kvm_fd)


def test_factory_is_lazy_and_its_fds_outlive_it(guest_memfd_ok: None) -> None:
    before = open_fd_count(os.getpid())
    factory = GuestMemfdFactory()
    assert repr(factory) == "<GuestMemfdFactory vm_fd=None kvm_fd=None>"
    assert open_fd_count(os.getpid()) == before  # nothing opened yet
    fd = factory.create(PAGE_SIZE)
    assert open_fd_count(os.getpid()) == before + 3  # /dev/kvm, the VM, the guest_memfd
    factory.close()
    factory.close()
    assert factory.closed and repr(factory) == "<GuestMemfdFactory closed>"
    assert open_fd_count(os.getpid()) == before + 1
    with pytest.raises(ValueError):
        factory.create(PAGE_SIZE)
    try:
        with Mapping.map_shared(fd, PAGE_SIZE, RW) as m:  # the VM lives on inside the gmem
            m.write(0, b"alive")
            assert m.read(0, 5) == b"alive"
    finally:
        os.close(fd)
