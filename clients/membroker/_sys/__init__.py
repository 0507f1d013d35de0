"""The one place membroker touches the OS directly: ctypes, mmap, SCM_RIGHTS, pidfds, KVM ioctls.

Used by the SDK (membroker) and the daemon (membrokerd) as `membroker._sys`; everything above it
gets typed Python objects, fds as plain ints (owned where a function says it returns one) and
OSError subclasses carrying the kernel's errno, or KernelFeatureMissing (see libc).
"""

from .kvm import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_GUEST_MEMFD_FLAGS,
    GuestMemfdFactory,
    check_extension,
    create_guest_memfd,
    create_vm,
    guest_memfd_support,
    open_kvm,
)
from .libc import PAGE_SIZE, KernelFeatureMissing, check
from .memfd import (
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    FdInfo,
    FdKind,
    add_seals,
    create_memfd,
    describe_fd,
    get_seals,
    hugetlb_free_pages,
)
from .mman import (
    MADV_DONTNEED,
    MADV_GUARD_INSTALL,
    MADV_GUARD_REMOVE,
    MADV_REMOVE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    Mapping,
    mapping_count_for_inode,
    vma_count,
)
from .proc import fd_targets, open_fd_count
from .sock import (
    MAX_FDS_PER_FRAME,
    PeerCred,
    peer_credentials,
    peer_pidfd,
    pidfd_is_alive,
    pidfd_open,
    pidfd_send_signal,
    recv_with_fds,
    send_with_fds,
)

__all__ = [  # noqa: RUF022 - curated: most important first, grouped by layer
    # errors and basics
    "KernelFeatureMissing",
    "PAGE_SIZE",
    "check",
    # backings
    "create_memfd",
    "describe_fd",
    "FdInfo",
    "FdKind",
    "get_seals",
    "add_seals",
    "hugetlb_free_pages",
    "F_SEAL_SEAL",
    "F_SEAL_SHRINK",
    "F_SEAL_GROW",
    "F_SEAL_WRITE",
    "F_SEAL_FUTURE_WRITE",
    "GuestMemfdFactory",
    "guest_memfd_support",
    "create_guest_memfd",
    "create_vm",
    "open_kvm",
    "check_extension",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_GUEST_MEMFD_FLAGS",
    "GUEST_MEMFD_FLAG_MMAP",
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    # mappings
    "Mapping",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "MADV_DONTNEED",
    "MADV_REMOVE",
    "MADV_GUARD_INSTALL",
    "MADV_GUARD_REMOVE",
    "mapping_count_for_inode",
    "vma_count",
    # session sockets and peers
    "MAX_FDS_PER_FRAME",
    "send_with_fds",
    "recv_with_fds",
    "PeerCred",
    "peer_credentials",
    "peer_pidfd",
    "pidfd_open",
    "pidfd_send_signal",
    "pidfd_is_alive",
    # /proc
    "open_fd_count",
    "fd_targets",
]
