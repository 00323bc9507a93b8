"""Child processes that `m3serve serve` (and the tests) start, watch and always stop.

Each child runs in its own session, so it leads a process group that contains everything it spawns
(SGLang's scheduler, detokenizer and TP ranks); stopping it signals the whole group (SIGTERM, then
SIGKILL after a grace period) and waits until the group is empty: no orphans.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now, chosen below the ephemeral range.

    Why not bind(0): that hands out an ephemeral port, and while the server is still starting, polling
    it (or any outgoing connection) can be given the same port as its *local* end (on loopback a
    connect to a port nobody listens on can even connect to itself), so the server then fails with
    "address already in use". Ports below the ephemeral range are never handed out that way.
    """
    lo, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, lo - 12000), lo)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port found on {host} below {lo}")


class ManagedProcess:
    """One child process group, with its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None,
                 log_path: str | Path | None = None) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-chars:]
        return data.decode("utf-8", "replace")

    def group_alive(self) -> bool:
        """Whether any process of this child's group still exists."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL whatever is left after `grace_s`, and reap the leader."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.alive() or self.group_alive()):
            self._reap()
            time.sleep(0.2)
        if self.alive() or self.group_alive():
            self._signal(signal.SIGKILL)
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and (self.alive() or self.group_alive()):
                self._reap()
                time.sleep(0.1)
        self._reap()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=0)
        except subprocess.TimeoutExpired:
            pass


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(url: str, processes: list[ManagedProcess], timeout_s: float, path: str = "/health") -> None:
    """Poll `url + path` until it answers 200; fail early (with the log tail) if a process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in processes:
            if not p.alive():
                raise RuntimeError(
                    f"{p.name} exited with code {p.proc.returncode} before {url} was ready; "
                    f"last output:\n{p.log_tail()}"
                )
        if http_ok(url + path):
            return
        time.sleep(1.0)
    tails = "\n".join(f"--- {p.name} ---\n{p.log_tail(2000)}" for p in processes)
    raise TimeoutError(f"{url}{path} not ready after {timeout_s:.0f} s\n{tails}")
