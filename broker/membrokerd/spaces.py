"""Spaces: one guest's memory (a backing fd, its layout, its access table) and their creation.

Used by the broker core. Creation and import validate the backing here, so that a space that
exists is always sealed, page aligned and of the size it claims.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import os
import secrets
import time
from collections.abc import Sequence

from membroker._sys import kvm as sys_kvm
from membroker._sys import memfd as sys_memfd
from membroker._sys.libc import PAGE_SIZE, KernelFeatureMissing
from membrokerd.access import AccessTable
from membrokerd.errors import BadRequest, FeatureMissing

HUGE_PAGE_SIZES = (2 << 20, 1 << 30)
REQUIRED_SEALS = sys_memfd.F_SEAL_SHRINK | sys_memfd.F_SEAL_GROW
# Guest-physical addresses are 64-bit: a region may end at 2**64 exactly, never past it.
GPA_LIMIT = 1 << 64


class BackingKind(enum.Enum):
    MEMFD = "memfd"
    MEMFD_HUGETLB = "memfd-hugetlb"
    GUEST_MEMFD = "guest_memfd"


@dataclasses.dataclass(frozen=True, slots=True)
class Region:
    """Guest-physical [gpa, gpa+size) is backing [offset, offset+size)."""

    gpa: int
    offset: int
    size: int


class Attachment(enum.Enum):
    VA = "va"
    FD = "fd"


class Space:
    """A backing fd (owned), its guest-physical layout and its access table."""

    def __init__(
        self,
        *,
        name: str,
        fd: int,
        size: int,
        backing: BackingKind,
        page_size: int,
        owner: str,
        owner_uid: int,
        ephemeral: bool,
        imported: bool,
        regions: Sequence[Region],
        dev: int,
        ino: int,
        space_id: str = "",
    ) -> None:
        # A restored space keeps the id its owner knows it by.
        self.space_id = space_id or "sp-" + secrets.token_hex(4)
        self.name = name or self.space_id
        self.fd = fd
        self.size = size
        self.backing = backing
        self.page_size = page_size
        self.owner = owner
        self.owner_uid = owner_uid
        self.ephemeral = ephemeral
        self.imported = imported
        self.regions = tuple(regions)
        self.dev = dev
        self.ino = ino
        self.table = AccessTable(size, page_size)
        # session id -> how that session uses the space
        self.attachments: dict[str, Attachment] = {}
        self.created_unix = time.time()
        self.deleting = False
        # Byte ranges a revocation is waiting to clear of pins: no new pin may start there.
        self.blocked: list[tuple[int, int]] = []
        # Set whenever a pin of this space goes away (revocations waiting on pins wake up).
        self.unpinned = asyncio.Event()
        self._ro_fd = -1
        self._sealed_support: str | None = None

    def sealed_unsupported(self) -> str:
        """'' when sealed VA mode works on this backing; else why not. Asked of the kernel
        once per space: the broker maps one page itself and registers it with a userfaultfd
        of its own the way a sealed client's mapping is registered (on 6.18 a guest_memfd
        mapping is refused: EINVAL)."""
        if self._sealed_support is None:
            self._sealed_support = _probe_sealed(self.fd, self.page_size)
        return self._sealed_support

    def read_only_fd(self) -> int:
        """An O_RDONLY description of the backing (not owned by the caller), reopened through
        /proc/self/fd: a holder can neither write the file nor punch holes in it, and mappings
        made from it can never become writable. -1 where the kernel cannot reopen the backing
        (a guest_memfd is an anonymous inode: it has no path to reopen)."""
        if self._ro_fd < 0 and self.fd >= 0:
            try:
                self._ro_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return -1
        return self._ro_fd

    def is_blocked(self, offset: int, length: int) -> bool:
        return any(offset < end and start < offset + length for start, end in self.blocked)

    def __repr__(self) -> str:
        return (
            f"<Space {self.space_id} {self.name!r} {self.backing.value} size={self.size} "
            f"owner={self.owner!r} seq={self.table.seq} attached={len(self.attachments)}>"
        )

    def close(self) -> None:
        if self._ro_fd >= 0:
            os.close(self._ro_fd)
            self._ro_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _probe_sealed(fd: int, page_size: int) -> str:
    from membroker._sys import mman
    from membroker._sys import uffd as sys_uffd

    try:
        uffd = sys_uffd.Uffd.create()
    except OSError as exc:
        return f"userfaultfd: {exc}"
    try:
        with mman.Mapping.map_shared(fd, page_size, mman.PROT_READ | mman.PROT_WRITE) as m:
            mode = sys_uffd.MODE_MISSING | sys_uffd.MODE_MINOR | sys_uffd.MODE_WP
            uffd.register(m.address, page_size, mode)
            uffd.unregister(m.address, page_size)
    except OSError as exc:
        return f"userfaultfd registration of this backing fails ({exc.strerror})"
    finally:
        uffd.close()
    if not sys_uffd.mseal_available():
        return "the kernel has no mseal"
    return ""


def check_regions(regions: Sequence[Region], size: int, page_size: int) -> None:
    """Regions must be page aligned, inside the backing, and not overlap in guest space."""
    spans = []
    for r in regions:
        if r.gpa < 0 or r.offset < 0 or r.size < 0:
            raise BadRequest(
                f"region gpa={r.gpa:#x} offset={r.offset:#x} size={r.size:#x} has a negative field"
            )
        if r.gpa + r.size > GPA_LIMIT:
            raise BadRequest(
                f"region gpa={r.gpa:#x} size={r.size:#x} ends at {r.gpa + r.size:#x}, "
                "beyond the 64-bit guest-physical address space"
            )
        if r.size == 0 or r.gpa % page_size or r.offset % page_size or r.size % page_size:
            raise BadRequest(
                f"region gpa={r.gpa:#x} offset={r.offset:#x} size={r.size:#x} "
                f"is empty or not aligned to {page_size}"
            )
        if r.offset + r.size > size:
            raise BadRequest(
                f"region gpa={r.gpa:#x} ends at backing offset "
                f"{r.offset + r.size:#x}, beyond the space size {size:#x}"
            )
        spans.append((r.gpa, r.gpa + r.size))
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise BadRequest(f"regions overlap in guest-physical space at {start:#x}")


def check_size(size: int, page_size: int, limit: int) -> None:
    if size <= 0 or size % page_size:
        raise BadRequest(f"size {size} is not a positive multiple of the page size {page_size}")
    if size > limit:
        raise BadRequest(f"size {size} exceeds max_space_bytes {limit}")


def create_backing(
    kind: BackingKind,
    name: str,
    size: int,
    huge_page_size: int,
    gmem: sys_kvm.GuestMemfdFactory | None,
) -> tuple[int, int]:
    """Allocates a backing; returns (owned fd, page size). The memfd is sealed before return."""
    if kind is BackingKind.MEMFD:
        return sys_memfd.create_memfd(f"membroker:{name}", size), PAGE_SIZE
    if kind is BackingKind.MEMFD_HUGETLB:
        if huge_page_size not in HUGE_PAGE_SIZES:
            raise BadRequest(f"huge_page_size must be 2 MiB or 1 GiB, not {huge_page_size}")
        if size % huge_page_size:
            raise BadRequest(f"size {size} is not a multiple of the huge page {huge_page_size}")
        try:
            fd = sys_memfd.create_memfd(f"membroker:{name}", size, hugetlb_page_size=huge_page_size)
        except OSError as exc:
            raise FeatureMissing(
                f"cannot allocate {size} bytes of {huge_page_size >> 20} MiB "
                f"huge pages (are any reserved? vm.nr_hugepages): {exc}"
            ) from exc
        return fd, huge_page_size
    if gmem is None:
        raise FeatureMissing("guest_memfd backing is unavailable: no KVM support configured")
    try:
        return gmem.create(size), PAGE_SIZE
    except KernelFeatureMissing as exc:
        raise FeatureMissing(f"guest_memfd backing is unavailable: {exc}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class ImportedBacking:
    """What an owner's fd turned out to be; `needs_seals` when the broker must seal it."""

    kind: BackingKind
    size: int
    page_size: int
    dev: int
    ino: int
    needs_seals: bool


def inspect_import(fd: int) -> ImportedBacking:
    """Validates an owner's fd without changing it (BadRequest says what is wrong)."""
    info = sys_memfd.describe_fd(fd)
    if info.kind == "other":
        raise BadRequest(f"imported fd is not a memfd or guest_memfd ({info.path})")
    if not info.writable:
        raise BadRequest("imported fd must be open read-write")
    kind = {
        "memfd": BackingKind.MEMFD,
        "memfd-hugetlb": BackingKind.MEMFD_HUGETLB,
        "guest_memfd": BackingKind.GUEST_MEMFD,
    }[info.kind]
    page = info.page_size
    if info.size <= 0 or info.size % page:
        raise BadRequest(f"imported fd has size {info.size}, not a positive multiple of {page}")
    needs_seals = False
    if kind is not BackingKind.GUEST_MEMFD:
        seals = info.seals or 0
        if seals & REQUIRED_SEALS != REQUIRED_SEALS:
            if seals & sys_memfd.F_SEAL_SEAL:
                raise BadRequest(
                    "imported memfd is not sealed against shrink/grow and its "
                    "seals are locked (F_SEAL_SEAL): create it with "
                    "MFD_ALLOW_SEALING and leave the sealing to the broker"
                )
            needs_seals = True
    return ImportedBacking(kind, info.size, page, info.dev, info.ino, needs_seals)


def seal_import(fd: int, size: int) -> None:
    """Seals an accepted memfd against shrink and grow, locks its seals, and checks that it
    still has the `size` inspect_import() saw.

    Kernel fact: seals belong to the inode, so the owner's own fd is sealed too: from now on
    no holder of the memfd can resize it under the guest. Until the seals are on, though, the
    owner (or anyone holding the memfd) can ftruncate it: the size read before sealing may be
    stale, so it is read again after, when it can no longer change.
    """
    sys_memfd.add_seals(fd, REQUIRED_SEALS | sys_memfd.F_SEAL_SEAL)
    sealed = os.fstat(fd).st_size
    if sealed != size:
        raise BadRequest(
            f"imported memfd changed size from {size} to {sealed} while being sealed "
            "(another holder resized it): import it again once it stops changing"
        )
