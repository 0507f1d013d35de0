"""Runs one membroker scenario as another user: imports as root, then drops to --uid/--gid
(the interpreter lives under /root, which other users cannot read) and prints a JSON result.

Scenarios: connect (open a session), create (create a space), attach SPACE (attach as VA),
hold (open a session, print the result, and keep the session until stdin closes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import membroker
import membroker.clients
import membroker.errors


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runtime-dir", required=True)
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("scenario", choices=["connect", "create", "attach", "hold"])
    p.add_argument("space", nargs="?")
    args = p.parse_args()
    os.setgroups([])
    os.setgid(args.gid)
    os.setuid(args.uid)
    result: dict[str, object] = {"uid": os.getuid()}
    try:
        with membroker.connect(args.name, args.runtime_dir, timeout=20) as session:
            result["session"] = session.session_id
            if args.scenario == "create":
                result["space"] = session.create_space(1 << 20).space_id
            elif args.scenario == "attach":
                result["ranges"] = len(session.attach_va(args.space).ranges())
            elif args.scenario == "hold":
                print(json.dumps(dict(result, ok=True)), flush=True)
                sys.stdin.read()
                return 0
        result["ok"] = True
    except membroker.errors.MembrokerError as exc:
        result.update(ok=False, error=type(exc).__name__, message=str(exc))
    except Exception as exc:
        result.update(
            ok=False, error=type(exc).__name__, message=str(exc), trace=traceback.format_exc()
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
