"""Sessions: one process that said Hello, with its identity, attachments and the kernel's view
of it.

Used by the broker core (handshake, frame dispatch, revocations) and enforcement (fencing looks
at the process after its connection is gone, so a session keeps its pidfd and view while
anything still needs them).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import time
from typing import TYPE_CHECKING

from membroker._sys.proc import ProcessView
from membroker.v1 import session_pb2 as spb
from membrokerd.listener import Connection
from membrokerd.policy import Identity
from membrokerd.spaces import Attachment

if TYPE_CHECKING:
    from membrokerd.enforcement import Fenced
    from membrokerd.faults import SealedMapping
    from membrokerd.revocation import Ack

CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")


class Session:
    """A process that said Hello: its identity, attachments, offered fds and awaited acks.

    It keeps its own pidfd and its view of the process (/proc) beyond the connection's life,
    while anything still needs them (a revocation judging it, a fencing checking on it):
    `retain()` / `release()`; the connection holds one reference until it closes.
    """

    def __init__(self, conn: Connection, name: str, identity: Identity) -> None:
        self.conn = conn
        self.name = name
        self.identity = identity
        self.session_id = "se-" + secrets.token_hex(4)
        self.token = secrets.token_urlsafe(24)
        # The resume token (Welcome.resume_token; "" when this session cannot be resumed) and
        # its hash, the only form the journal keeps; the process start time it is bound to.
        self.resume_token = ""
        self.resume_hash = ""
        self.start_time = -1
        # Resumed from a session of an earlier connection (Hello.resume_token).
        self.resumed = False
        self.created = time.monotonic()
        self.attached: dict[str, Attachment] = {}
        self.attached_at: dict[str, float] = {}
        self.offered: dict[int, int] = {}
        self.pending_acks: dict[tuple[str, int], Ack] = {}
        # The kernel's view of the process (None when it cannot be had and verify = off).
        self.view: ProcessView | None = None
        # space id -> where this (VA) client says it mapped the space (a hint, never trusted)
        self.va_base: dict[str, int] = {}
        # space id -> why this client's isolation of it is logical only (its own word)
        self.isolation: dict[str, str] = {}
        # space id -> the look at this process after it detached from the space, while it
        # runs (an attach to the space waits for it)
        self.letting_go: dict[str, asyncio.Task[None]] = {}
        # space id -> attached in sealed mode, mapping not yet checked: whether it may map
        # writable; and the mapping once accepted
        self.sealing: dict[str, bool] = {}
        self.sealed: dict[str, SealedMapping] = {}
        # space ids of sealed attachments being resumed: re-synchronised once accepted
        self.resyncing: set[str] = set()
        # space id -> an fd client attached with a read-only description (until upgraded)
        self.read_only_fd: set[str] = set()
        # the control calls in flight on the socket or its call channel (Call frames), by id
        self.calls: dict[int, asyncio.Task[None]] = {}
        # The session's call channel (a CallChannel frame's socket), while it is open.
        self.channel: Connection | None = None
        # gRPC calls of this session's token in flight (the session socket's own are `calls`).
        self.grpc_calls = 0
        self.pidfd = os.dup(conn.pidfd)
        self.fencing: asyncio.Future[Fenced] | None = None
        self.killed: str | None = None
        self._refs = 1
        self._next_tag = 1

    @property
    def pid(self) -> int:
        return self.identity.pid

    @property
    def uid(self) -> int:
        return self.identity.uid

    def retain(self) -> None:
        self._refs += 1

    def release(self) -> None:
        """Drops one reference; the last one closes the view and the pidfd."""
        self._refs -= 1
        if self._refs == 0:
            if self.view is not None:
                self.view.close()
                self.view = None
            if self.pidfd >= 0:
                os.close(self.pidfd)
                self.pidfd = -1

    def next_tag(self) -> int:
        tag, self._next_tag = self._next_tag, self._next_tag + 1
        return tag

    def deliver_fd(self, fd: int, space_id: str, *, upgrade: bool = False) -> int:
        """Sends a space's fd on the session socket; returns the tag the reply names."""
        tag = self.next_tag()
        self.conn.send(
            spb.Frame(fd_delivery=spb.FdDelivery(tag=tag, space_id=space_id, upgrade=upgrade)),
            [fd],
        )
        return tag

    def issue_resume_token(self) -> None:
        self.resume_token = secrets.token_urlsafe(32)
        self.resume_hash = token_hash(self.resume_token)

    def __repr__(self) -> str:
        return (
            f"<Session {self.session_id} {self.name!r} pid={self.pid} "
            f"attached={sorted(self.attached)}>"
        )


def token_hash(token: str) -> str:
    """What the journal keeps of a resume token: its SHA-256, so that reading the journal
    gives no token away."""
    return hashlib.sha256(token.encode()).hexdigest()


def process_start_time(pid: int, pidfd: int) -> int:
    """The start time of process `pid` (/proc/PID/stat field 22, clock ticks since boot), read
    while `pidfd` shows that process still running (so the pid was not reused meanwhile);
    -1 when it cannot be had (another PID namespace, exited)."""
    from membroker._sys import sock as sys_sock

    if pid <= 0:
        return -1
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start = int(fields[19])
        if not sys_sock.pidfd_is_alive(pidfd):
            return -1
    except (OSError, IndexError, ValueError):
        return -1
    return start
