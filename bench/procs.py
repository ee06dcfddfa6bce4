"""The real sidecar processes (`sidecar watch`, `sidecar worker`) as subprocesses, and writers.

Each child runs in its own process group with the settings in its environment (exactly what
`sidecar up` hands its children), logs to a file, and is stopped with SIGTERM, then SIGKILL of
its group if it does not go within the deadline.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import redis

from worker.keys import Keys
from worker.settings import Settings

from .workload import JSONL, dumps


def child_env(settings: Settings) -> dict[str, str]:
    """This environment without SIDECAR_* variables, plus the settings as SIDECAR_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings.as_env())
    return env


class Child:
    """One `python -m worker.cli <args>` subprocess, in the environment `env` (see `child_env`)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"{self.log_path.name} exited with {code}:\n{self.log()[-3000:]}")

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout:.0f} s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()


def start_worker(settings: Settings, log_path: Path, concurrency: int = 2) -> Child:
    """`sidecar worker` (the default pool), ready to take tasks when this returns."""
    child = Child(["worker", "--concurrency", str(concurrency)], child_env(settings), log_path)
    child.wait_for(lambda: " ready." in child.log(), timeout=60, what="worker ready")
    return child


def start_watcher(settings: Settings, log_path: Path, client: redis.Redis) -> Child:
    """`sidecar watch`, past its first full scan when this returns.

    A marker file is written under the root first; the watcher has finished its first scan (and
    its inotify watches are in place, as they are set up before that scan) once the marker's
    checkpoint is in Redis.
    """
    rel = write_marker(settings.require_root())
    offsets = Keys(settings.redis_prefix).offsets
    child = Child(["watch"], child_env(settings), log_path)
    child.wait_for(lambda: client.hexists(offsets, rel), timeout=300, what="watcher's first scan")
    return child


def write_marker(root: Path) -> str:
    """A one-line sidecar file under `root`; returns its path relative to the root (its offsets key)."""
    marker = root / "bench-ready" / JSONL
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_bytes(dumps({"dataset": "dataset://bench-ready", "metadata": {"ready": True}}))
    return f"bench-ready/{JSONL}"


@contextlib.contextmanager
def running(child: Child) -> Iterator[Child]:
    try:
        yield child
    finally:
        child.stop()


# -- memory -----------------------------------------------------------------------------------------


def rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc/<pid>/status."""
    current = peak = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return current, peak


def children_of(pid: int) -> list[int]:
    """Direct children (a prefork worker's pool processes, if any)."""
    try:
        raw = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in raw.split()]
