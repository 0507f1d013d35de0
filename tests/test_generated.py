"""The generated protobuf modules match proto/ (run `make proto` when this fails)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_modules_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = {p.name: p.read_bytes() for p in gen.generate(tmp_path)}
    committed_dir = ROOT / "clients" / "membroker" / "v1"
    committed = {
        p.name: p.read_bytes() for p in committed_dir.iterdir() if p.suffix in (".py", ".pyi")
    }
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert stale == [], f"stale generated modules {stale}: run `make proto`"
