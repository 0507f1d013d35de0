"""membrokerd's configuration: a TOML file plus MEMBROKER_* environment variables.

Precedence, highest first: explicit overrides (command-line flags), environment variables
(`MEMBROKER_REVOKE_DEADLINE_MS=500`), the TOML file, the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


def default_runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/membroker")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "membroker" if xdg else Path("/tmp") / f"membroker-{os.geteuid()}"


class ConfigError(Exception):
    """The configuration cannot be used; the message says which setting and why."""


class BrokerConfig(BaseSettings):
    """Every setting of the daemon, validated."""

    model_config = SettingsConfigDict(env_prefix="MEMBROKER_", extra="forbid")

    runtime_dir: Path = Field(
        default_factory=default_runtime_dir,
        description="Where control.sock and session.sock are created.",
    )
    state_dir: str | None = Field(
        None,
        description="Where the journal (journal.sqlite and its change log, changes.N.log) "
        "keeps spaces, attributes and grants "
        "so that a restarted daemon takes them back (with the space fds from systemd's fd "
        "store). Unset: /var/lib/membroker when runtime_dir is /run/membroker (the unit's "
        "StateDirectory=), else RUNTIME_DIR.state beside the runtime directory. Empty: no "
        "journal (nothing survives a restart).",
    )
    control_socket_mode: int = Field(0o660, ge=0, le=0o777)
    session_socket_mode: int = Field(0o660, ge=0, le=0o777)
    metrics_address: str = Field(
        "127.0.0.1:9464",
        description="host:port of the Prometheus endpoint; port 0 picks one; empty disables.",
    )
    revoke_deadline_ms: int = Field(
        2000, ge=1, le=600_000, description="How long a client has to acknowledge a revoke."
    )
    revoke_deadline_us_per_range: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="Extra time a client gets to tear down a large revocation, per range, on "
        "top of revoke_deadline_ms (a million ranges at 5 us: 5 s more).",
    )
    fence_action: Literal["disconnect", "kill"] = Field(
        "disconnect",
        description="What fencing does besides closing the session and dropping its grants: "
        "'kill' also sends SIGKILL through the pidfd taken when the session was accepted.",
    )
    on_pinned: Literal["fail", "fence"] = Field(
        "fail",
        description="What a revocation does, by default, about a range still pinned at the "
        "deadline: 'fail' (nothing changes) or 'fence' (fence the pinning clients, go on).",
    )
    verify: Literal["always", "off"] = Field(
        "always",
        description="Check the kernel's view of each client (/proc/PID/maps, pagemap) before "
        "counting its acknowledgement of a revoke.",
    )
    audit_interval_s: float = Field(
        10.0,
        ge=0,
        description="Seconds between full audits of every attached client's mappings; 0 = off.",
    )
    loop_probe_ms: float = Field(
        100.0,
        ge=0,
        le=10_000,
        description="Period of the event-loop lag probe (membroker_event_loop_lag_seconds: how "
        "late a timer of this period fires); 0 = off. Benchmarks use 1.",
    )
    owner_uids: list[int] = Field(
        default_factory=list,
        description="Uids that may create or import spaces (with owner_gids; both empty: any).",
    )
    owner_gids: list[int] = Field(default_factory=list)
    attach_uids: list[int] = Field(
        default_factory=list,
        description="Uids that may attach to spaces (with attach_gids; both empty: any).",
    )
    attach_gids: list[int] = Field(default_factory=list)
    client_names: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Client names reserved for some uids: {name = [uid, ...]}; a name not "
        "listed may be used by anyone.",
    )
    max_sessions_per_uid: int = Field(256, ge=1)
    max_spaces_per_owner: int = Field(64, ge=1)
    max_bytes_per_owner: int = Field(1 << 40, ge=4096)
    max_grant_fragments_per_client: int = Field(
        1_000_000, ge=2, description="Grant ranges one client name may hold in one space."
    )
    max_client_names_per_uid: int = Field(
        4096,
        ge=1,
        description="Client names one uid may bind (client_name_binding = uid: a name is its "
        "first user's for good); a new name past it is refused.",
    )
    resume_window_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Seconds after a start during which the previous daemon's sessions may "
        "resume; then a process of theirs that still maps a space is fenced.",
    )
    seal_timeout_ms: int = Field(
        10_000,
        ge=100,
        le=60_000,
        description="How long a sealed-mode VA client may take from Attach to its Sealed "
        "report (plus revoke_deadline_us_per_range per range it holds); it holds a read-write "
        "description meanwhile, and is fenced after.",
    )
    max_pins_per_session: int = Field(
        4096,
        ge=1,
        description="Pins one session may hold in one space at once (each revocation looks at "
        "every pin it overlaps).",
    )
    max_frame_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_sessions: int = Field(1024, ge=1)
    max_spaces: int = Field(256, ge=1)
    max_space_bytes: int = Field(1 << 40, ge=4096, description="Largest single space, bytes.")
    max_offered_fds: int = Field(
        8, ge=1, le=64, description="Fds a session may have offered and not yet used."
    )
    hello_timeout_s: float = Field(
        2.0,
        ge=0.1,
        le=60,
        description="Seconds a new session connection has to say Hello before it is closed.",
    )
    max_pending_hellos_per_uid: int = Field(
        16,
        ge=1,
        description="Session connections of one uid that may be open and not yet past Hello.",
    )
    max_outbound_bytes: int = Field(
        64 << 20,
        ge=64 << 10,
        description="Bytes queued to one session peer that it has not read; at this cap the "
        "connection is closed (a peer that does not read is a peer to drop).",
    )
    outbound_pause_bytes: int = Field(
        256 << 10,
        ge=4096,
        description="Above this many bytes queued to a session peer the broker stops reading "
        "from it until the queue drains below half of it.",
    )
    on_unverifiable: Literal["fence", "report"] = Field(
        "fence",
        description="What follows when an acknowledgement cannot be verified (the kernel's "
        "view of the client process cannot be read): 'fence' the client, or only 'report' it "
        "as unverified.",
    )
    on_fenced_still_mapped: Literal["kill", "report"] = Field(
        "kill",
        description="A fenced client that still maps or holds the space after the disconnect "
        "is killed through its pidfd ('kill'), or only reported ('report').",
    )
    fence_grace_ms: int = Field(
        200,
        ge=0,
        le=10_000,
        description="Milliseconds a disconnected (fenced) client has to drop its mappings "
        "before it is checked again.",
    )
    attach_without_grant: bool = Field(
        False,
        description="Whether a client holding no grant on a space may attach to it (and so "
        "receive its fd) ahead of any grant.",
    )
    va_mode: Literal["any", "sealed"] = Field(
        "any",
        description="'sealed': a VA client must attach in sealed mode (sealed mapping, no fd, "
        "first touches decided by the broker through its userfaultfd); 'any': a client may "
        "also attach cooperatively (it keeps its mapping to its grants itself; verification "
        "and fencing catch one that does not).",
    )
    client_name_binding: Literal["uid", "none"] = Field(
        "uid",
        description="'uid': a client name is bound to the uid that first used it, for the "
        "daemon's life (unless client_names reserves it); 'none': any uid may use any "
        "unreserved name once it is free.",
    )
    log_level: str = Field("INFO")

    # Where load_config found this configuration (file, overrides): a reload reads it again.
    _source: tuple[Path | None, dict[str, Any]] = PrivateAttr(default=(None, {}))

    @field_validator("control_socket_mode", "session_socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError as exc:
                raise ValueError(f"socket mode {value!r} is not an octal number like 0660") from exc
        return value

    @field_validator("metrics_address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value == "":
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port (for example 127.0.0.1:9464)")
        return value

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return value
        if not os.path.isabs(value):
            raise ValueError(f"{value!r} is not an absolute path (or empty: no journal)")
        return os.path.normpath(value)

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        level = value.upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"{value!r} is not one of DEBUG, INFO, WARNING, ERROR")
        return level

    @model_validator(mode="after")
    def _outbound_limits(self) -> BrokerConfig:
        if self.outbound_pause_bytes >= self.max_outbound_bytes:
            raise ValueError(
                f"outbound_pause_bytes ({self.outbound_pause_bytes}) must be less than "
                f"max_outbound_bytes ({self.max_outbound_bytes})"
            )
        return self

    @property
    def journal_dir(self) -> Path | None:
        """The resolved state_dir, or None when the journal is off."""
        if self.state_dir == "":
            return None
        if self.state_dir is not None:
            return Path(self.state_dir)
        if self.runtime_dir == Path("/run/membroker"):
            return Path("/var/lib/membroker")
        return self.runtime_dir.with_name(self.runtime_dir.name + ".state")

    @property
    def lock_file(self) -> Path:
        return self.runtime_dir / "membrokerd.lock"

    @property
    def control_socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def session_socket(self) -> Path:
        return self.runtime_dir / "session.sock"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _toml_file.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)


# The TOML path for the one load in progress (pydantic-settings takes sources at class level).
_toml_file: dict[str, Path] = {}


def load_config(path: Path | None = None, **overrides: Any) -> BrokerConfig:
    """Loads and validates; raises ConfigError naming each bad setting and where it came from."""
    if path is not None and not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    if path is not None:
        _toml_file["path"] = path
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        config = BrokerConfig(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            if not err["loc"]:  # a rule across settings (model validator) names them itself
                lines.append(f"  {err['msg']}")
                continue
            loc = ".".join(str(p) for p in err["loc"])
            env = f"MEMBROKER_{loc.upper()}"
            lines.append(f"  {loc} (file key {loc!r} or ${env}): {err['msg']}")
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n" + "\n".join(lines)) from None
    except (OSError, ValueError) as exc:  # TOML syntax errors surface as ValueError subclasses
        raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    finally:
        _toml_file.pop("path", None)
    config._source = (path, given)
    return config


# Settings a running daemon cannot take from a reload (SIGHUP): what was bound or sized at
# start (sockets and their modes, the metrics endpoint, frame buffers), the periodic tasks'
# on/off and periods, and the client-name binding (its table is only kept in "uid" mode). Every
# other setting is read by the broker each time it is used, so a reload applies it to what
# happens next (new sessions, attaches, grants, revocations); a revocation already in progress
# may see the new values for the steps it has not reached yet.
RESTART_REQUIRED = frozenset(
    {
        "runtime_dir",
        "state_dir",
        "control_socket_mode",
        "session_socket_mode",
        "metrics_address",
        "max_frame_bytes",
        "audit_interval_s",
        "loop_probe_ms",
        "client_name_binding",
        "resume_window_s",
    }
)


@dataclasses.dataclass(frozen=True)
class Reload:
    """What a reload found: the configuration to run with now (the new file's values, except
    the RESTART_REQUIRED ones which keep their running values), the settings it changed, and
    the changed settings that wait for a restart."""

    config: BrokerConfig
    applied: tuple[str, ...]
    need_restart: tuple[str, ...]


def reload_config(running: BrokerConfig) -> Reload:
    """Reads the configuration again from where `running` came from (same file, same
    environment variables, same command-line overrides). Raises ConfigError, changing nothing,
    when the new one is not valid."""
    path, given = running._source
    fresh = load_config(path, **given)
    changed = [
        name
        for name in type(running).model_fields
        if getattr(fresh, name) != getattr(running, name)
    ]
    need_restart = tuple(n for n in changed if n in RESTART_REQUIRED)
    applied = tuple(n for n in changed if n not in RESTART_REQUIRED)
    merged = fresh.model_copy(update={n: getattr(running, n) for n in need_restart})
    merged._source = running._source
    return Reload(merged, applied, need_restart)
