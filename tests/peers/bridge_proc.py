"""A real bridge process: membroker.vhost_user.BlkBridge (or vhost_net.NetBridge, with
start device=net) between a broker space and a vhost-user backend, driven by JSON lines (see
test_vhost_user.py, test_vhost_net.py).

Ops: start SPACE SOCKET [device, iommu, mem_slots]; exported; queue GPA; request KIND SECTOR
GPA LENGTH; net: net_queues GPA, post_rx GPA LENGTH, post_rx_raw (unchecked), send GPA FRAME,
post_tx GPA LENGTH (a buffer written by the owner), receive COUNT WAIT, in_flight, revocations,
iotlb_log; isolation (what the bridge found and told the broker); refresh; full_reads (how many
full reads of the backend's maps the bridge has made); watch
(returns once the bridge has handled a backend hang-up on its own: when it noticed, and why);
sabotage (the next REM_MEM_REG names a region the backend does not have: libvhost-user panics
and drops the connection); close.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import membroker
from membroker import vhost_net, vhost_user

# The repository root, for the framing the test peers share (tests/peer_io.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.peer_io import answer, requests


class Traffic:
    def __init__(self, bridge: Any, tx: int, frame: bytes, length: int) -> None:
        self.bridge, self.tx, self.frame, self.length = bridge, tx, frame, length
        self.sent = self.received = self.bad = 0
        self.refused: list[int] = []
        self.errors: list[str] = []
        self.received_at: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.bridge.send(self.tx, self.frame)
                self.sent += 1
                for p in self.bridge.receive(1, 0.05):
                    self.received += 1
                    self.received_at.append([time.monotonic(), p.gpa])
                    if p.frame != self.frame:
                        self.bad += 1
                    try:
                        self.bridge.post_rx(p.gpa, self.length)
                    except vhost_user.VhostUserError:
                        self.refused.append(p.gpa)
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.01)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(10)
        return {
            "sent": self.sent,
            "received": self.received,
            "bad": self.bad,
            "refused": self.refused,
            "errors": self.errors[:5],
            "received_at": self.received_at,
        }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--name", default="bridge")
    args = parser.parse_args()
    session = membroker.connect(args.name, args.runtime_dir)
    bridge: Any = None
    traffic: Any = None

    answer({"ready": True, "pid": os.getpid()})
    for req in requests():
        op = req["op"]
        try:
            if op == "start":
                kind = vhost_net.NetBridge if req.get("device") == "net" else vhost_user.BlkBridge
                bridge = kind(
                    session,
                    req["space"],
                    req["socket"],
                    use_mem_slots=req.get("mem_slots", True),
                    iommu=req.get("iommu", False),
                )
                answer(
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
                answer(
                    {
                        "ok": True,
                        "regions": [[r.gpa, r.size, r.mmap_offset] for r in bridge.exported()],
                    }
                )
            elif op == "queue":
                bridge.start_queue(req["gpa"])
                answer({"ok": True})
            elif op == "request":
                status = bridge.request(req["kind"], req["sector"], req["gpa"], req["length"])
                answer({"ok": True, "status": status})
            elif op == "refresh":
                answer({"ok": True, "left_out": bridge.refresh(req.get("seq", 0))})
            elif op == "queue_state":
                answer(
                    {"ok": True, "running": bridge.queue is not None, "why": bridge.queue_stopped}
                )
            elif op == "watch":
                gone = bridge.wait_gone(req.get("timeout", 10))
                answer(
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
                answer({"ok": True})
            elif op == "net_queues":
                bridge.start_queues(req["gpa"])
                answer({"ok": True})
            elif op == "post_rx":
                answer({"ok": True, "head": bridge.post_rx(req["gpa"], req["length"])})
            elif op == "post_rx_raw":
                # Test only: a receive buffer put on the ring without the bridge's check (a
                # driver that ignores what is exported), to see what the backend does with it.
                with bridge._lock:
                    q = bridge._queues[vhost_net.RX]
                    head = bridge._free[vhost_net.RX].pop()
                    q.write_desc(head, req["gpa"], req["length"], vhost_user._DESC_WRITE)
                    bridge._posted[vhost_net.RX][head] = vhost_net.Buffer(
                        req["gpa"], req["length"], req["gpa"]
                    )
                    q.publish(head)
                    os.eventfd_write(bridge.kick, 1)
                answer({"ok": True, "head": head})
            elif op == "post_tx":
                answer({"ok": True, "head": bridge.post_tx(req["gpa"], req["length"])})
            elif op == "isolation":
                answer(
                    {
                        "ok": True,
                        "backend_keeps_fds": bridge.backend_keeps_fds,
                        "isolation": bridge.isolation,
                    }
                )
            elif op == "send":
                answer({"ok": True, "head": bridge.send(req["gpa"], bytes.fromhex(req["frame"]))})
            elif op == "receive":
                packets = bridge.receive(req.get("count", 1), req.get("wait", 2.0))
                answer({"ok": True, "packets": [[p.gpa, p.data.hex()] for p in packets]})
            elif op == "traffic":
                # Traffic from a thread until traffic_stop: a frame sent, what comes back
                # received and its buffer posted again (refused once it is revoked).
                traffic = Traffic(bridge, req["tx"], bytes.fromhex(req["frame"]), req["length"])
                answer({"ok": True})
            elif op == "traffic_stop":
                answer({"ok": True, **traffic.stop()})
            elif op == "in_flight":
                flight = bridge.in_flight()
                answer(
                    {
                        "ok": True,
                        "rx": [[b.gpa, b.length] for b in flight[vhost_net.RX]],
                        "tx": [[b.gpa, b.length] for b in flight[vhost_net.TX]],
                    }
                )
            elif op == "revocations":
                answer(
                    {
                        "ok": True,
                        "revocations": [
                            {
                                "cut": r.cut,
                                "taken_off": r.taken_off,
                                "in_backend": r.in_backend,
                                "lost": r.lost,
                            }
                            for r in bridge.revocations
                        ],
                    }
                )
            elif op == "stats":
                # A control call of this session (its first one opens its call channel).
                answer({"ok": True, "sessions": session.stats().sessions})
            elif op == "full_reads":
                answer({"ok": True, "full_reads": bridge.full_reads})
            elif op == "iotlb_log":
                answer({"ok": True, "log": [list(e) for e in bridge.iotlb_log]})
            elif op == "close":
                bridge.close()
                bridge = None
                answer({"ok": True})
            else:
                answer({"ok": False, "error": f"unknown op {op}"})
        except Exception as exc:
            answer({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    session.close()


if __name__ == "__main__":
    main()
