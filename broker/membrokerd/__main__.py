"""Command line of the daemon: `membrokerd [--config FILE] [--runtime-dir DIR] ...`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from membrokerd.config import ConfigError, load_config


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

    try:
        uvloop.run(serve(config))
    except OSError as exc:
        print(f"membrokerd: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
