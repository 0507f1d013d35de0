"""The journal's resumable sessions: what a resume token is bound to survives the process,
the token itself is never stored, and a session that ends (or is resumed) is gone."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from membrokerd.journal import Journal, SessionRecord
from membrokerd.sessions import token_hash


def test_sessions_are_kept_by_token_hash_and_replaced_on_resume(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state")
    token = "secret-resume-token"
    first = SessionRecord(token_hash(token), "backend", 1000, 4242, 123456, 1.5)
    other = SessionRecord(token_hash("other"), "vmm", 0, 77, 99, 2.5)
    try:
        journal.add_session(first)
        journal.add_session(other)
        assert sorted(journal.load().sessions, key=lambda r: r.client) == [first, other]
        # The resumed session's row replaces the old one in one transaction.
        resumed = SessionRecord(token_hash("next"), "backend", 1000, 4242, 123456, 3.5)
        journal.add_session(resumed, replaces=first.token_sha256)
        journal.end_sessions(other.token_sha256)
        assert journal.load().sessions == [resumed]
    finally:
        journal.close()
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite")
    try:
        text = "\n".join(str(row) for row in db.execute("SELECT * FROM sessions"))
    finally:
        db.close()
    assert "next" not in text and token_hash("next") in text
    # Opened again (a restart): still there.
    again = Journal(tmp_path / "state")
    try:
        assert again.load().sessions == [resumed]
    finally:
        again.close()
