"""PID namespaces: why a client cannot be verified, and what to do about it.

The broker verifies a client from the kernel's view of its process: /proc/PID/maps, pagemap and
the fd table. That needs the client's pid to exist in the broker's PID namespace. A client in a
namespace that is neither the broker's nor nested inside it (another container, or the host
when the broker runs in a container) has no pid here: SO_PEERCRED says 0, and no /proc entry of
ours names it. SO_PEERPIDFD still gives the broker a pidfd of the very process, which is enough
to tell *why* it cannot be inspected (membroker._sys.pidfd_peer): alive elsewhere (our fdinfo
says Pid 0), or gone (-1). It is not enough to inspect it: nothing opens another namespace's
/proc/PID files from a pidfd. Nor to fence it: pidfd_send_signal refuses (EINVAL) a process
outside our namespace and its descendants; only polling for its exit works. So such a client
is refused (with verify = "always"), with a message that names the namespace problem and the
two ways out:

- the client joins the broker's PID namespace: a pod with ``shareProcessNamespace: true`` and
  the broker as a sidecar (podman/docker: ``--pid=container:<broker>``);
- the broker joins the host's, which contains every container's: a node DaemonSet with
  ``hostPID: true`` (podman/docker: ``--pid=host``).

The handshake calls `inspect_refusal` when ProcessView(pid) failed; the rest is pure.
"""

from __future__ import annotations

import enum
import errno

from membroker._sys.pidfd_peer import PidfdView, own_pid_namespace, pidfd_view

__all__ = [
    "FIXES",
    "PeerPlace",
    "describe_invisible_peer",
    "describe_uninspectable",
    "inspect_refusal",
    "place_of",
]

# The two ways out, in the words an operator searches for.
FIXES = (
    "run the client in the daemon's PID namespace (Kubernetes: the daemon as a sidecar of a pod "
    "with shareProcessNamespace: true; podman/docker: --pid=container:<daemon>), or the daemon "
    "in the host's (a DaemonSet with hostPID: true; podman/docker: --pid=host)"
)


class PeerPlace(enum.Enum):
    """Where a session peer's process is, seen from the broker's PID namespace."""

    VISIBLE = "visible"  # it has a pid here: /proc/PID is its
    OTHER_NAMESPACE = "other_namespace"  # alive, in a PID namespace outside ours
    EXITED = "exited"  # gone since it connected
    UNKNOWN = "unknown"  # the kernel did not say (no pidfd, or an fdinfo without Pid:)


def place_of(view: PidfdView | None, cred_pid: int) -> PeerPlace:
    """Where the peer is, from our fdinfo of its pidfd (`view`, None without one) and the pid
    SO_PEERCRED gave (0 when the peer was outside our namespace at connect)."""
    if view is not None and view.pid is not None:
        if view.pid < 0:
            return PeerPlace.EXITED
        if view.pid == 0:
            return PeerPlace.OTHER_NAMESPACE
        return PeerPlace.VISIBLE
    # No pidfd: SO_PEERCRED's pid 0 alone already means "no pid in our namespace".
    return PeerPlace.OTHER_NAMESPACE if cred_pid == 0 else PeerPlace.UNKNOWN


def describe_invisible_peer(peer_namespace: str | None, own_namespace: str | None) -> str:
    """The refusal of a client whose process is in another PID namespace: what is wrong, why it
    matters, and the two fixes. Namespaces as their /proc links read (``pid:[4026531836]``)."""
    if peer_namespace is not None and own_namespace is not None:
        where = f"{peer_namespace}; the daemon's is {own_namespace}"
    elif own_namespace is not None:
        where = f"the daemon's is {own_namespace}"
    else:
        where = "not the daemon's"
    return (
        f"cannot verify this client: its process is in another PID namespace ({where}), so it "
        "has no pid here (SO_PEERCRED pid 0) and the daemon cannot read its /proc maps, pagemap "
        f"and fd table, which verification needs. Fix: {FIXES}; or set verify = off to accept "
        "clients unverified (and unkillable: signals do not reach that namespace either)"
    )


def describe_uninspectable(pid: int, exc: OSError) -> str:
    """The refusal of a visible client whose /proc entries cannot be opened (permissions)."""
    return (
        f"cannot inspect process {pid} ({exc.strerror}): verification needs its /proc maps, "
        "pagemap and fd table (CAP_SYS_PTRACE for other users' processes), or verify = off"
    )


def inspect_refusal(pidfd: int, cred_pid: int, exc: OSError) -> str:
    """Why a session's process could not be inspected (ProcessView(cred_pid) raised `exc`), as
    the handshake's refusal: another PID namespace, exited, or not permitted.

    `pidfd` is the session's pidfd (borrowed; SO_PEERPIDFD, or -1 without one)."""
    view: PidfdView | None = None
    if pidfd >= 0:
        try:
            view = pidfd_view(pidfd)
        except OSError:
            view = None
    place = place_of(view, cred_pid)
    if place is PeerPlace.OTHER_NAMESPACE:
        return describe_invisible_peer(
            view.pid_namespace if view is not None else None, own_pid_namespace()
        )
    if place is PeerPlace.EXITED or (
        place is PeerPlace.UNKNOWN and exc.errno in (errno.ENOENT, errno.ESRCH)
    ):
        return f"the process (pid {cred_pid}) exited during the handshake"
    return describe_uninspectable(cred_pid, exc)
