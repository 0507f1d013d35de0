"""A benchmark VA client process: attaches to a space, prints "ready", then serves pushes (in
the SDK's reader thread) until stdin closes. Used by bench/revoke_bench.py, scale_bench.py and
flood_bench.py.

    python bench/_client.py RUNTIME_DIR CLIENT_NAME SPACE_ID [MODE]

MODE: the VA mode (auto, sealed, cooperative; default auto: sealed where the kernel offers it).

Lines on stdin are commands, each answered with one line on stdout:

    seq      the seq of the latest access change this client applied (an int)
    held     how many ranges it holds now
    closed   "open", or why the session ended (fenced clients learn why)
"""

from __future__ import annotations

import sys

import membroker


def main() -> None:
    runtime_dir, name, space_id = sys.argv[1:4]
    mode = sys.argv[4] if len(sys.argv) > 4 else "auto"
    with membroker.connect(name, runtime_dir) as session:
        client = session.attach_va(space_id, mode=mode)
        print("ready", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "seq":
                answer = str(client.seq)
            elif command == "held":
                answer = str(len(client.ranges()))
            elif command == "closed":
                answer = session.closed_reason or "open"
            else:
                answer = f"unknown command {command!r}"
            print(answer, flush=True)
        client.close()


if __name__ == "__main__":
    main()
