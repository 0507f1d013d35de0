"""Who may do what: identity policy (by uid/gid, from SO_PEERCRED) and per-identity quotas.

Pure checks used by the broker core; each refusal names the rule or limit that refused.
"""

from __future__ import annotations

import dataclasses

from membrokerd.config import BrokerConfig
from membrokerd.errors import LimitReached, NotAllowed


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """A peer process as the kernel vouches for it."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    def __str__(self) -> str:
        return f"pid {self.pid} (uid {self.uid}, gid {self.gid})"


def _allowed(who: Identity, uids: list[int], gids: list[int]) -> bool:
    if not uids and not gids:
        return True
    return who.uid in uids or who.gid in gids or not who.groups.isdisjoint(gids)


def check_name(config: BrokerConfig, who: Identity, name: str) -> None:
    reserved = config.client_names.get(name)
    if reserved is not None and who.uid not in reserved:
        raise NotAllowed(
            f"client name {name!r} is reserved for uid(s) {reserved} (client_names); {who} "
            "may not use it"
        )


def check_owner(config: BrokerConfig, who: Identity) -> None:
    if not _allowed(who, config.owner_uids, config.owner_gids):
        raise NotAllowed(
            f"{who} may not own spaces (owner_uids = {config.owner_uids}, "
            f"owner_gids = {config.owner_gids})"
        )


def check_attach(config: BrokerConfig, who: Identity) -> None:
    if not _allowed(who, config.attach_uids, config.attach_gids):
        raise NotAllowed(
            f"{who} may not attach to spaces (attach_uids = {config.attach_uids}, "
            f"attach_gids = {config.attach_gids})"
        )


def check_sessions(config: BrokerConfig, who: Identity, live_of_uid: int) -> None:
    if live_of_uid >= config.max_sessions_per_uid:
        raise LimitReached(
            "max_sessions_per_uid",
            config.max_sessions_per_uid,
            f"too many sessions of uid {who.uid}",
        )


def check_owner_quota(
    config: BrokerConfig, owner: str, spaces: int, size_total: int, new_size: int
) -> None:
    if spaces >= config.max_spaces_per_owner:
        raise LimitReached(
            "max_spaces_per_owner", config.max_spaces_per_owner, f"{owner!r} owns {spaces} spaces"
        )
    if size_total + new_size > config.max_bytes_per_owner:
        raise LimitReached(
            "max_bytes_per_owner",
            config.max_bytes_per_owner,
            f"{owner!r} owns {size_total} bytes and asks for {new_size} more",
        )


def check_grant_quota(config: BrokerConfig, client: str, fragments: int) -> None:
    # One grant adds at most two ranges (its readable and writable sets) to a client.
    if fragments + 2 > config.max_grant_fragments_per_client:
        raise LimitReached(
            "max_grant_fragments_per_client",
            config.max_grant_fragments_per_client,
            f"client {client!r} holds {fragments} grant ranges in this space",
        )
