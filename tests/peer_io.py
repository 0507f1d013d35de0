"""The peer side of the JSON-line protocol that the test peers speak (tests/conftest.py's
PeerProc is the other side): one request per line on stdin, one answer per line on stdout,
after a first line that says the peer is ready. Each peer script keeps its own ops and the
shape of its error answers; this is the framing they share."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any


def answer(obj: dict[str, Any]) -> None:
    """One answer line (flushed: the test is waiting for it)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def requests() -> Iterator[dict[str, Any]]:
    """The requests, until stdin ends or an "exit" request (answered here)."""
    for line in sys.stdin:
        req: dict[str, Any] = json.loads(line)
        if req["op"] == "exit":
            answer({"ok": True})
            return
        yield req
