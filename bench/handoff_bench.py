"""What the SDK's reader thread costs a caller that waits for an answer (issue 9, item 1): a
session Ping answered by the daemon, waited for the SDK's way (the reader thread takes the
Pong and wakes the calling thread) and read on the calling thread itself (a second session,
framed by hand, no reader thread); and a control call (GetStats) on the SDK's call channel
(read by the calling thread) and on the session socket (the reader thread hands the answer
over: the path of a call made while another thread uses the channel). Alternating rounds on
one daemon, beside a Unix-socket ping-pong between two processes.

    .venv/bin/python bench/handoff_bench.py [--rounds 6] [--iterations 1000]
        [--out bench/results/handoff.md]

Both sessions are served by the same daemon, whose loop decodes each Ping and answers it the
same way; what differs is only who reads the answer. The daemon is ended by its pid.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from revoke_bench import ROOT, Daemon, bench_socket_pingpong, percentiles, timeit, write_results

import membroker
from membroker import wire
from membroker.v1 import session_pb2 as spb

SDK = "session ping, the SDK's: the reader thread takes the Pong, wakes the caller"
RAW = "session ping read on the calling thread (a raw session, no reader thread)"
SOCKET = "baseline: Unix-socket ping-pong between processes"
CALL_CHANNEL = "SDK call (GetStats) on its call channel, read by the calling thread"
CALL_READER = "SDK call (GetStats) on the session socket, handed over by the reader thread"


class RawSession:
    """A session whose frames are read on the thread that sends (Hello, then Pings)."""

    def __init__(self, runtime_dir: Path, name: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(runtime_dir / "session.sock"))
        self.decoder = wire.FrameDecoder()
        hello = spb.Hello(protocol_version=wire.PROTOCOL_VERSION, client_name=name)
        self.sock.sendall(wire.encode(spb.Frame(hello=hello)))
        (welcome,) = self._frames()
        if welcome.WhichOneof("body") != "welcome":
            raise RuntimeError(f"no Welcome: {welcome}")
        self.nonce = 0

    def _frames(self) -> list[spb.Frame]:
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the daemon closed the raw session")
            frames = [frame for frame, _ in self.decoder.feed(data, [])]
            if frames:
                return frames

    def ping(self) -> None:
        self.nonce += 1
        self.sock.sendall(wire.encode(spb.Frame(ping=spb.Ping(nonce=self.nonce))))
        while True:
            for frame in self._frames():
                if frame.WhichOneof("body") == "pong" and frame.pong.nonce == self.nonce:
                    return

    def close(self) -> None:
        self.sock.close()
        self.decoder.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "handoff.md")
    args = parser.parse_args()
    samples: dict[str, list[float]] = {SDK: [], RAW: [], CALL_CHANNEL: [], CALL_READER: []}
    per_round: list[tuple[float, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="membroker-bench-") as tmp:
        daemon = Daemon(Path(tmp) / "rt", verify="off")
        try:
            with (
                membroker.connect("handoff-sdk", daemon.runtime_dir) as session,
                membroker.connect("handoff-reader", daemon.runtime_dir) as reader,
            ):
                # This session's calls never use a call channel: each answer comes through
                # its reader thread.
                reader._call_channels = False
                raw = RawSession(daemon.runtime_dir, "handoff-raw")
                try:
                    timeit(session.ping, 200)  # warm-up, every way
                    timeit(raw.ping, 200)
                    timeit(session.stats, 200)
                    timeit(reader.stats, 200)
                    for i in range(args.rounds):
                        print(f"round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
                        got = {
                            SDK: timeit(session.ping, args.iterations),
                            RAW: timeit(raw.ping, args.iterations),
                            CALL_CHANNEL: timeit(session.stats, args.iterations),
                            CALL_READER: timeit(reader.stats, args.iterations),
                        }
                        for name, times in got.items():
                            samples[name] += times
                        sdk, mine, chan, handed = (percentiles(got[k])[0] for k in samples)
                        per_round.append((sdk, mine, chan, handed))
                    assert session.calls_on_channel > 0 and reader.calls_on_channel == 0
                finally:
                    raw.close()
        finally:
            daemon.stop()
    rows = [(SOCKET, percentiles(bench_socket_pingpong(args.iterations)))]
    rows += [(name, percentiles(times)) for name, times in samples.items()]
    lines = ["| what | p50 µs | p99 µs | mean µs |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {p50:.0f} | {p99:.0f} | {mean:.0f} |" for name, (p50, p99, mean) in rows]
    lines += [
        "",
        "p50 of each round, µs (ping: SDK / calling thread; call: channel / reader thread): "
        + ", ".join(f"{a:.0f} / {b:.0f}; {c:.0f} / {d:.0f}" for a, b, c, d in per_round),
        "",
        f"The reader thread's hand-off: {rows[1][1][0] - rows[2][1][0]:+.0f} µs p50 for a "
        f"ping (SDK minus calling thread), {rows[4][1][0] - rows[3][1][0]:+.0f} µs p50 for a "
        "call (reader thread minus call channel).",
    ]
    body = "\n".join(lines)
    print(body)
    write_results(
        args.out,
        "Hand-off through the SDK's reader thread",
        f", {args.rounds} rounds of {args.iterations} pings each way, alternating.",
        body,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
