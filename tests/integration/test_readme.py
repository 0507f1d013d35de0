"""The README's tour really runs: its shell block and its Python blocks, against a real daemon."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"```(sh|python)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def _env(daemon) -> dict[str, str]:
    env = dict(os.environ)
    env["MEMBROKER_RUNTIME_DIR"] = str(daemon.runtime_dir)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["PYTHONPATH"] = f"{ROOT / 'clients'}:{ROOT / 'broker'}"
    return env


def test_readme_has_the_blocks():
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("python") >= 2 and kinds.count("sh") >= 2


def test_tour_shell_block(daemon):
    tour = next(body for kind, body in BLOCKS if kind == "sh" and "membrokerctl" in body)
    script = "\n".join(line for line in tour.splitlines() if not line.startswith("export "))
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env=_env(daemon),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"sp-[0-9a-f]{8}\s+guest0\s+memfd\s+64M\s+2M\s+membrokerctl", out), out
    assert re.search(r"backend\s+0x0\s+1M\s+RW", out), out
    assert "512K revoked" in out and "(no attached client affected)" in out, out


@pytest.mark.parametrize("index", [i for i, (k, _) in enumerate(BLOCKS) if k == "python"])
def test_python_blocks(daemon, index):
    code = BLOCKS[index][1]
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(daemon), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    if "hello from the guest" in code:
        lines = proc.stdout.splitlines()
        assert lines[0] == "cooperative"  # beside the owner's fd, as the comment says
        assert lines[1] == "b'hello from the guest'"
        assert lines[2] == "b'written by the backend'"
        assert lines[3].startswith("[('backend', 'acked', ")
        assert lines[4] == "False"
    else:
        assert (
            "stop DMA on [AccessRange(offset=0, length=1048576, access=<Access.NONE: 0>)]"
            in proc.stdout
        )
        assert "1 pin" in proc.stdout
