"""Starting reward servers for the tests: real processes on 127.0.0.1, ephemeral ports, stopped by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

from helpers import ROOT

HERE = Path(__file__).parent
START_TIMEOUT = 120.0  # seconds for a server to print its URL (`dag serve-reward` imports torch)


def dag_command() -> list[str]:
    """The installed `dag` script next to this interpreter, else `python -m dagcli`."""
    script = Path(sys.executable).parent / "dag"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dagcli"]


class Server:
    """A server process and the URL it printed."""

    def __init__(self, args: list[str], env: dict | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **(env or {})}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.first_line = self._first_line()
        self.url = "http://" + self.first_line.split("http://", 1)[1].split()[0]

    def _first_line(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if "http://" in line:
                    return line.strip()
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
        self.stop()
        raise RuntimeError("server did not print its URL in time")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def standin(mode: str, count: int = 0):
    """A stand-in server of tests/helpers/reward_standins.py in `mode` (see there)."""
    server = Server([sys.executable, str(HERE / "reward_standins.py"), mode, str(count)])
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def serve_reward(*args: str, env: dict | None = None):
    """`dag serve-reward ARGS --port 0` (CPU); `env` e.g. DAGCLI_FAULT=serve-reward-compute:2 kills it (SIGKILL)
    when its second request arrives."""
    server = Server([*dag_command(), "serve-reward", *args, "--port", "0", "--device", "cpu"], env)
    try:
        yield server
    finally:
        server.stop()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
