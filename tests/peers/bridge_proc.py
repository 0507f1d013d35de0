"""A real bridge process: membroker.vhost_user.BlkBridge between a broker space and a
vhost-user-blk backend, driven by JSON lines (see test_vhost_user.py).

Ops: start SPACE SOCKET; exported; queue GPA; request KIND SECTOR GPA LENGTH; refresh; watch
(returns once the bridge has handled a backend hang-up on its own: when it noticed, and why);
sabotage (the next REM_MEM_REG names a region the backend does not have: libvhost-user panics
and drops the connection); close.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import membroker
from membroker import vhost_user


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--name", default="bridge")
    args = parser.parse_args()
    session = membroker.connect(args.name, args.runtime_dir)
    bridge: Any = None

    def out(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    out({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "exit":
                out({"ok": True})
                break
            if op == "start":
                bridge = vhost_user.BlkBridge(
                    session, req["space"], req["socket"], use_mem_slots=req.get("mem_slots", True)
                )
                out(
                    {
                        "ok": True,
                        "features": bridge.features,
                        "mem_slots": bridge.mem_slots,
                        "protocol_features": bridge.protocol_features,
                        "prefix_mapping": bridge.prefix_mapping,
                        "backend_pid": bridge.frontend.backend_pid,
                    }
                )
            elif op == "exported":
                out(
                    {
                        "ok": True,
                        "regions": [[r.gpa, r.size, r.mmap_offset] for r in bridge.exported()],
                    }
                )
            elif op == "queue":
                bridge.start_queue(req["gpa"])
                out({"ok": True})
            elif op == "request":
                status = bridge.request(req["kind"], req["sector"], req["gpa"], req["length"])
                out({"ok": True, "status": status})
            elif op == "refresh":
                out({"ok": True, "left_out": bridge.refresh()})
            elif op == "queue_state":
                out({"ok": True, "running": bridge.queue is not None, "why": bridge.queue_stopped})
            elif op == "watch":
                gone = bridge.wait_gone(req.get("timeout", 10))
                out(
                    {
                        "ok": True,
                        "gone": gone,
                        "reason": bridge.gone,
                        "gone_at": bridge.gone_at,
                        "now": time.monotonic(),
                    }
                )
            elif op == "sabotage":
                frontend = bridge.frontend
                real = frontend.remove_region

                def wrong_region(
                    region: vhost_user.MemRegion, frontend: Any = frontend, real: Any = real
                ) -> None:
                    frontend.remove_region = real
                    real(dataclasses.replace(region, gpa=region.gpa + (1 << 40)))

                frontend.remove_region = wrong_region
                out({"ok": True})
            elif op == "close":
                bridge.close()
                bridge = None
                out({"ok": True})
            else:
                out({"ok": False, "error": f"unknown op {op}"})
        except Exception as exc:
            out({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    session.close()


if __name__ == "__main__":
    main()
