"""Helpers for the end-to-end tests that run `sidecar` commands as real subprocesses.

Everything here waits with a bounded deadline and never asserts how fast something happened:
the machines are shared and noisy, so a slow run is fine and only a wrong result is a failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

_T = TypeVar("_T")


def wait_until(
    predicate: Callable[[], _T | None], timeout: float = 30.0, interval: float = 0.1, what: str = "condition"
) -> _T:
    """Poll `predicate` until it returns something truthy; return that. Fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_error = None
        except AssertionError as exc:  # a predicate may assert to explain what it is waiting for
            last_error = exc
        if time.monotonic() > deadline:
            detail = f": {last_error}" if last_error else ""
            raise AssertionError(f"{what} not reached within {timeout:.0f} s{detail}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment without any SIDECAR_* variable (so nothing leaks in), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


# -- processes (Linux /proc; no psutil in the venv) -----------------------------------------


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of a live process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may hold spaces; the fields after it are fixed.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid`, as pid -> command line."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    found: dict[int, str] = {}
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = cmdline(child)
                stack.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def still_running(processes: Mapping[int, str]) -> dict[int, str]:
    """Those of `processes` still alive (same pid and same command line; zombies count as gone)."""
    alive: dict[int, str] = {}
    for pid, cmd in processes.items():
        st = _stat(pid)
        if st is not None and st[1] != "Z" and cmdline(pid) == cmd:
            alive[pid] = cmd
    return alive


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 45.0) -> int:
    """SIGTERM a process started with start_new_session=True, wait; SIGKILL its group on timeout.

    Returns the exit code (negative when it had to be killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
    return proc.wait()


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the whole process group of `proc` (its children too), then reap `proc`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
