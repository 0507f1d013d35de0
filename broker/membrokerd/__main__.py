"""Command line of the daemon: `membrokerd [--config FILE] [--runtime-dir DIR] ...`."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from pathlib import Path

from membrokerd.config import ConfigError, load_config

# The GIL switch interval in the daemon (see main).
SWITCH_INTERVAL_S = 0.0005


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="membrokerd",
        description="membroker daemon: brokers a VM's memory to other processes.",
        epilog="Every setting can also come from the TOML file or a MEMBROKER_<NAME> variable.",
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")
    parser.add_argument("--runtime-dir", type=Path, help="directory for the sockets")
    parser.add_argument("--metrics-address", help="host:port for /metrics ('' disables)")
    parser.add_argument("--revoke-deadline-ms", type=int)
    parser.add_argument("--log-level")
    args = parser.parse_args(argv)
    try:
        config = load_config(
            args.config,
            runtime_dir=args.runtime_dir,
            metrics_address=args.metrics_address,
            revoke_deadline_ms=args.revoke_deadline_ms,
            log_level=args.log_level,
        )
    except ConfigError as exc:
        print(f"membrokerd: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvloop

    from membrokerd.server import serve

    # Large changes are computed and encoded on worker threads. With the default 5 ms switch
    # interval a busy worker keeps the GIL for 5 ms each time the loop gives it up for a
    # syscall, and a loop callback doing a few syscalls waits that long several times over
    # (bench/scale_bench.py: lag max 95-147 ms at 1M fragments, against 36-71 ms at 0.5 ms).
    # Threads only switch this often while more than one wants to run.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # Everything imported so far (gRPC, protobuf, the daemon: ~45,000 objects) lives as long as
    # the process: keep the collector from walking it in every full collection, each of which
    # would stall the event loop for that long (bench/scale_bench.py saw 13-33 ms ones).
    gc.collect()
    gc.freeze()

    try:
        uvloop.run(serve(config))
    except OSError as exc:
        print(f"membrokerd: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
