"""membrokerctl: the operator's command line for membrokerd (tables for people, --json for tools).

Each invocation opens its own session as client `--name` (default "membrokerctl"); spaces it
creates are owned by that name and outlive the command, so a later invocation with the same name
can share, grant, revoke and delete them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf.json_format import MessageToDict

from membroker.errors import MembrokerError
from membroker.session import Session
from membroker.types import RevocationReport, SpaceInfo
from membroker.v1 import broker_pb2 as pb

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'4096', '0x1000', '64M', '2GiB' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t.startswith("0X"):
            return int(t, 16)
        unit = t[-1] if t and t[-1] in _UNITS else ""
        number = t[: len(t) - len(unit)]
        return int(number) * _UNITS[unit]
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 4096, 0x1000, 64M, 2G)"
        ) from None


def human(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def _report(report: RevocationReport) -> str:
    head = (
        f"space {report.space_id} seq {report.seq} ({report.cause or 'change'}): "
        f"{human(report.revoked_bytes)} revoked in {report.duration_us} us"
        + (" (its caller had gone)" if report.caller_gone else "")
    )
    if not report.clients:
        return head + " (no attached client affected)"
    notes = [
        f"{c.client} ({c.session_id}): isolation is logical only: {c.isolation}"
        for c in report.clients
        if c.isolation
    ]
    headers = ["CLIENT", "SESSION", "PID", "OUTCOME", "FENCE", "LATENCY_US"]
    headers += ["WITHDRAWN", "IN_FLIGHT", "REASON"]
    rows = [
        (
            c.client,
            c.session_id,
            c.pid,
            c.outcome,
            c.fence or "-",
            c.latency_us,
            _spans(c.withdrawn),
            _spans(c.in_flight),
            c.reason,
        )
        for c in report.clients
    ]
    return "\n".join([head, table(headers, rows), *notes])


def _spans(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{o:#x}+{n:#x}" for o, n in ranges) or "-"


def _spaces(spaces: list[SpaceInfo]) -> str:
    return table(
        ["SPACE", "NAME", "BACKING", "SIZE", "SHARED", "OWNER", "SEQ", "ATTACHED", "GRANTEES"],
        [
            (
                s.space_id,
                s.name,
                s.backing,
                human(s.size),
                human(s.shared_bytes),
                s.owner,
                s.seq,
                s.attachments,
                s.grant_clients,
            )
            for s in spaces
        ],
    )


ON_PINNED_HELP = (
    "if a client still pins the range at the deadline: fail (nothing changes) or fence it "
    "(default: the broker's on_pinned setting)"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="membrokerctl", description=__doc__.splitlines()[0])
    p.add_argument(
        "--runtime-dir",
        help="where membrokerd's sockets are "
        "(default $MEMBROKER_RUNTIME_DIR or the daemon's default)",
    )
    p.add_argument("--name", default="membrokerctl", help="client name of this session")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sub.add_parser("spaces", help="list spaces")
    sub.add_parser("sessions", help="list live sessions")
    sub.add_parser("stats", help="broker counters")
    g = sub.add_parser("grants", help="list the grants of a space")
    g.add_argument("space")
    g.add_argument("--client", default="")
    rl = sub.add_parser("revocations", help="the latest revocation reports of a space (owner only)")
    rl.add_argument("space")
    rl.add_argument("--after-seq", type=int, default=0, help="only reports after this seq")
    pn = sub.add_parser("pins", help="list the pins of a space")
    pn.add_argument("space")

    c = sub.add_parser("create-space", help="allocate a space owned by --name")
    c.add_argument("--size", type=parse_size, required=True)
    c.add_argument("--backing", choices=["memfd", "guest_memfd", "memfd-hugetlb"], default="memfd")
    c.add_argument("--space-name", default="")
    c.add_argument("--huge-page-size", type=parse_size, default=0)
    c.add_argument("-q", "--quiet", action="store_true", help="print only the new space id")

    d = sub.add_parser("delete-space", help="revoke everything, then free the space")
    d.add_argument("space")
    d.add_argument("--on-pinned", choices=["fail", "fence"], help=ON_PINNED_HELP)

    for cmd, text in (
        ("share", "mark a range shared"),
        ("unshare", "mark a range private (revokes it from every client)"),
    ):
        s = sub.add_parser(cmd, help=text)
        s.add_argument("space")
        s.add_argument("offset", type=parse_size)
        s.add_argument("length", type=parse_size)
        if cmd == "unshare":
            s.add_argument("--on-pinned", choices=["fail", "fence"], help=ON_PINNED_HELP)

    gr = sub.add_parser("grant", help="grant a client ro/rw access to a shared range")
    gr.add_argument("space")
    gr.add_argument("client")
    gr.add_argument("offset", type=parse_size)
    gr.add_argument("length", type=parse_size)
    gr.add_argument("--access", choices=["ro", "rw"], default="rw")

    rv = sub.add_parser("revoke", help="take a client's access back (waits for its ack)")
    rv.add_argument("space")
    rv.add_argument("client")
    rv.add_argument("offset", type=parse_size)
    rv.add_argument("length", type=parse_size)
    rv.add_argument("--on-pinned", choices=["fail", "fence"], help=ON_PINNED_HELP)

    up = sub.add_parser(
        "upgrade",
        help="live upgrade: the daemon re-executes its program (same pid), handing over its "
        "sockets and spaces; sessions resume (root or the daemon's uid only)",
        description="Asks membrokerd to re-execute its own program (the code installed now) "
        "in place, same pid: it hands its listening sockets, space fds and journal to the new "
        "process; connections made meanwhile wait in the sockets' backlog, connected clients "
        "reconnect and resume their sessions. Under systemd this is a reload as far as the "
        "manager is concerned (RELOADING=1, then READY=1 with the same MAINPID). "
        "Equivalent: SIGUSR2 to the daemon.",
    )
    up.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the daemon has accepted (default: wait until the new process serves)",
    )
    up.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    return p


def _upgrade(args: argparse.Namespace, session: Session) -> tuple[str, Any]:
    """Upgrade, then (unless --no-wait) wait for this session to end and a new one to be
    welcomed by the new process: how long the daemon did not answer."""
    resp = session.call("Upgrade", pb.UpgradeRequest())
    t0 = time.monotonic()
    out: dict[str, Any] = {"pid": resp.pid, "argv": list(resp.argv)}
    if args.no_wait:
        return f"membrokerd {resp.pid} is upgrading: {' '.join(resp.argv)}", out
    deadline = t0 + args.timeout
    while not session.closed and time.monotonic() < deadline:
        time.sleep(0.005)
    left = max(0.1, deadline - time.monotonic())
    with Session(args.name, args.runtime_dir, timeout=left, resume=0) as again:
        again.stats()
        out["serving_after_ms"] = round((time.monotonic() - t0) * 1000, 1)
        out["new_pid"] = again.broker_pid
    return (
        f"membrokerd {resp.pid} upgraded in place ({' '.join(resp.argv)}); serving again "
        f"{out['serving_after_ms']} ms after the request"
    ), out


def run(args: argparse.Namespace, session: Session) -> tuple[str, Any]:
    """Runs one command; returns (text for people, object for --json)."""
    cmd = args.cmd
    if cmd == "spaces":
        spaces = session.list_spaces()
        return _spaces(spaces), [dataclasses.asdict(s) for s in spaces]
    if cmd == "sessions":
        sessions = session.list_sessions()
        notes = [
            f"{s.session_id} ({s.client}) {sp}: isolation is logical only: {s.isolation[sp]}"
            for s in sessions
            for sp in sorted(s.isolation)
        ]
        text = table(
            ["SESSION", "CLIENT", "PID", "UID", "ATTACHED", "OWNS", "PINS", "AGE_S"],
            [
                (
                    s.session_id,
                    s.client,
                    s.pid,
                    s.uid,
                    ",".join(
                        sp
                        + ("(sealed)" if sp in s.sealed_spaces else "")
                        + ("(logical-only)" if sp in s.isolation else "")
                        for sp in s.attached_spaces
                    )
                    or "-",
                    ",".join(s.owned_spaces) or "-",
                    s.pins,
                    f"{s.age_seconds:.0f}",
                )
                for s in sessions
            ],
        )
        return "\n".join([text, *notes]), [MessageToDict(s) for s in sessions]
    if cmd == "stats":
        st = session.stats()
        d = {f.name: getattr(st, f.name) for f in st.DESCRIPTOR.fields}
        return table(["STAT", "VALUE"], sorted(d.items())), d
    if cmd == "grants":
        grants = session.list_grants(args.space, args.client)
        return table(
            ["CLIENT", "OFFSET", "LENGTH", "ACCESS"],
            [(c, hex(r.offset), human(r.length), r.access.name) for c, r in grants],
        ), [
            {"client": c, "offset": r.offset, "length": r.length, "access": r.access.name}
            for c, r in grants
        ]
    if cmd == "revocations":
        reports = session.list_revocations(args.space, args.after_seq)
        text = "\n\n".join(_report(r) for r in reports) or "(none)"
        return text, [dataclasses.asdict(r) for r in reports]
    if cmd == "pins":
        pins = session.list_pins(args.space)
        return table(
            ["PIN", "CLIENT", "SESSION", "OFFSET", "LENGTH", "WRITE", "AGE_S"],
            [
                (
                    p.pin_id,
                    p.client,
                    p.session_id,
                    hex(p.range.offset),
                    human(p.range.length),
                    p.write,
                    f"{p.age_seconds:.1f}",
                )
                for p in pins
            ],
        ), [MessageToDict(p) for p in pins]
    if cmd == "create-space":
        space = session.create_space(
            args.size,
            backing=args.backing,
            name=args.space_name,
            huge_page_size=args.huge_page_size,
        )
        space.close()
        text = space.space_id if args.quiet else _spaces([space.info])
        return text, dataclasses.asdict(space.info)
    if cmd == "delete-space":
        report = session.space(args.space).delete(on_pinned=args.on_pinned)
        return _report(report), dataclasses.asdict(report)
    if cmd in ("share", "unshare"):
        handle = session.space(args.space)
        if cmd == "share":
            report = handle.share(args.offset, args.length)
        else:
            report = handle.unshare(args.offset, args.length, on_pinned=args.on_pinned)
        return _report(report), dataclasses.asdict(report)
    if cmd == "grant":
        seq = session.space(args.space).grant(args.client, args.offset, args.length, args.access)
        text = (
            f"granted {args.client} {args.access} {hex(args.offset)}+{human(args.length)} "
            f"on {args.space} (seq {seq})"
        )
        return text, {"seq": seq}
    if cmd == "upgrade":
        return _upgrade(args, session)
    if cmd == "revoke":
        report = session.space(args.space).revoke(
            args.client, args.offset, args.length, on_pinned=args.on_pinned
        )
        return _report(report), dataclasses.asdict(report)
    raise AssertionError(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # A one-shot command: it does not resume across a restart of the daemon.
        with Session(args.name, args.runtime_dir, resume=0) as session:
            text, obj = run(args, session)
    except MembrokerError as exc:
        print(f"membrokerctl: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"membrokerctl: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(obj, indent=2, default=str) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
