"""A VA client process for tests with huge grant patterns: answers with counts, never lists.

JSON lines on stdin, one answer each on stdout (tests/conftest.py PeerProc): attach, held
(how many ranges and bytes it holds, and the VMAs of its mapping), read, exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import membroker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args()
    session = membroker.connect(args.name, args.runtime_dir, timeout=120)
    va: Any = None

    def out(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def held() -> dict[str, Any]:
        ranges = va.ranges()
        lo, hi = va.address, va.address + va.size
        with open("/proc/self/maps") as maps:
            vmas = sum(lo <= int(line.split("-", 1)[0], 16) < hi for line in maps)
        return {"ranges": len(ranges), "bytes": sum(r.length for r in ranges), "vmas": vmas}

    out({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "exit":
                out({"ok": True})
                break
            if req["op"] == "attach":
                va = session.attach_va(req["space"])
                out({"ok": True, **held()})
            elif req["op"] == "held":
                out({"ok": True, "seq": va.seq, **held()})
            elif req["op"] == "read":
                out({"ok": True, "data": va.read(req["offset"], 1).hex()})
            else:
                out({"ok": False, "error": f"unknown op {req['op']}"})
        except Exception as exc:
            out({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    session.close()


if __name__ == "__main__":
    main()
