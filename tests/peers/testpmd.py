"""DPDK testpmd as a vhost-user-net backend (PEERS.md): started as a child process with its
stdin on a pipe, a vhost port serving SOCK, forwarding packets back to the same port (one
port: it pairs with itself). Ended by `stop()` (quit on stdin, then SIGKILL by pid if it does
not go), which also removes its runtime directory under /var/run/dpdk.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

TESTPMD = shutil.which("dpdk-testpmd")
_names = itertools.count()


class DpdkTestpmd:
    def __init__(self, tmp: Path, *, iommu: bool = False, mode: str = "io") -> None:
        if TESTPMD is None:
            raise RuntimeError("dpdk-testpmd is not installed (bash deploy/install-test-deps.sh)")
        self.prefix = f"membroker-{os.getpid()}-{next(_names)}"
        self.sock = tmp / f"{self.prefix}.sock"
        self.log_path = tmp / f"{self.prefix}.log"
        vdev = f"net_vhost0,iface={self.sock},client=0"
        if iommu:
            vdev += ",iommu-support=1"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                TESTPMD,
                "-l",
                "0-1",
                "--no-huge",
                "-m",
                "128",
                "--no-pci",
                "--no-shconf",
                "--no-telemetry",
                f"--file-prefix={self.prefix}",
                "--vdev",
                vdev,
                "--",
                "-i",
                "--total-num-mbufs=2048",
                f"--forward-mode={mode}",
                # Packets the bridge sends before forwarding starts wait on its ring (testpmd
                # would otherwise drain and drop them at start).
                "--no-flush-rx",
            ],
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        self.started = False
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"testpmd did not create its socket: {self.log()}")
            time.sleep(0.01)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def start(self) -> None:
        """Starts forwarding (the forwarding lcore then polls)."""
        self.command("start")
        self.started = True

    def stop(self) -> int:
        if self.proc.poll() is None:
            try:
                if self.started:
                    self.command("stop")
                self.command("quit")
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        return self.proc.returncode
