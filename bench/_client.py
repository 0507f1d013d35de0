"""A benchmark VA client process: attaches to a space, prints "ready", serves pushes until stdin
closes. Used by bench/revoke_bench.py."""

from __future__ import annotations

import sys

import membroker


def main() -> None:
    runtime_dir, name, space_id = sys.argv[1:4]
    with membroker.connect(name, runtime_dir) as session:
        client = session.attach_va(space_id)
        print("ready", flush=True)
        sys.stdin.read()
        client.close()


if __name__ == "__main__":
    main()
