"""The Procfile, run the way the README's Deployment section documents it: `honcho start`.

`SIDECAR_REDIS_URL=... SIDECAR_DATABASE_URL=... SIDECAR_ROOT=... honcho start` must bring up the
HTTP server, a Celery worker and a watcher that together take a sidecar file written under the
root to the API once its version completes by webhook; SIGTERM to honcho must stop all of them.
Runs on SQLite and on PostgreSQL (a schema of this test only), with this test's Redis key prefix.

How honcho runs a Procfile line matters for the stop check: each line becomes `/bin/sh -c "<line>"`
in a session of its own (so killing honcho's process group does not reach them); on SIGTERM honcho
sends SIGTERM to each of those groups, waits for their output pipes to close, and SIGKILLs what is
still running 5 s later. Its exit code after a SIGTERM is 143. The per-process codes it prints are
the shells' (Debian's dash does not exec the command), so they say nothing about the sidecar
processes; this test checks those through their log lines and by looking for them in /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e_helpers import (
    clean_env,
    cmdline,
    descendants,
    free_port,
    kill_group,
    still_running,
    wait_until,
)
from worker.staging import Staging

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

REPO = Path(__file__).resolve().parent.parent
PROCFILE = REPO / "Procfile"
VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 90.0
DEADLINE = 45.0
HONCHO_SIGTERM_CODE = 128 + signal.SIGTERM  # honcho's Manager sets this when it gets SIGTERM


def processes_with_env(marker: str) -> dict[int, str]:
    """Live processes (pid -> command line) whose environment holds `marker` (`NAME=value`).

    Every process honcho starts inherits the test's environment, including its unique Redis
    prefix, so this finds them even if one was reparented after its parent died."""
    needle = marker.encode() + b"\0"
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes() + b"\0"
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if b"\0" + needle in b"\0" + environ:
            found[int(entry)] = cmdline(int(entry))
    return still_running(found)


def kill_all(processes: dict[int, str]) -> None:
    """SIGKILL what is left of `processes` (same pid and command line), one by one."""
    for pid in still_running(processes):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Honcho:
    """`honcho start -f Procfile` in a session of its own, logging to a file."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.log_path = cwd / "honcho.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "honcho", "start", "-f", str(PROCFILE)],
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.seen: dict[int, str] = {}  # every process seen under honcho, pid -> command line

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def look(self) -> dict[int, str]:
        """Note (and return) what runs under honcho now."""
        if self.proc.poll() is None:
            self.seen.update(descendants(self.proc.pid))
        return self.seen

    def parts(self) -> set[str]:
        """Which `sidecar` commands were seen running (the Python processes, not their shells)."""
        return {
            part
            for cmd in self.seen.values()
            for part in ("serve", "worker", "watch")
            if f"sidecar {part}" in cmd and not cmd.startswith("/bin/sh")
        }

    def close(self, marker: str) -> None:
        """Kill whatever is left, pass or fail: honcho's group, then each Procfile process (they
        live in sessions of their own), then anything else carrying this test's environment."""
        self.look()
        kill_group(self.proc)
        kill_all(self.seen)
        kill_all(processes_with_env(marker))
        self._log.close()


def write_reference_file(
    path: Path, dataset_metadata: dict[str, Any], version_metadata: dict[str, Any]
) -> None:
    """Exactly as the reference page writes `valohai.metadata.jsonl`."""
    path.parent.mkdir(parents=True)
    with open(path, "w") as outfile:
        for dataset_name, ds_metadata in dataset_metadata.items():
            json.dump({"dataset": dataset_name, "metadata": ds_metadata}, outfile)
            outfile.write("\n")
        for dataset_version_name, dsv_metadata in version_metadata.items():
            json.dump({"dataset-version": dataset_version_name, "metadata": dsv_metadata}, outfile)
            outfile.write("\n")


def version_page(http: httpx.Client, dataset: str, version: str) -> dict[str, Any] | None:
    response = http.get("/api/v0/dataset-versions/", params={"dataset": dataset, "name": version})
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page["results"][0] if page["count"] else None


def dataset_properties(http: httpx.Client, name: str) -> dict[str, Any] | None:
    response = http.get("/api/v0/datasets/", params={"name": name})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    return results[0]["properties"] if results else None


def honcho_env(redis_url: str, prefix: str, database_url: str, root: Path, port: int) -> dict[str, str]:
    return clean_env(
        {
            "SIDECAR_REDIS_URL": redis_url,
            "SIDECAR_REDIS_PREFIX": prefix,
            "SIDECAR_DATABASE_URL": database_url,
            "SIDECAR_ROOT": str(root),
            "SIDECAR_PORT": str(port),
            "SIDECAR_RESCAN_INTERVAL": "1",
            "SIDECAR_SWEEP_AFTER": "1",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )


def test_procfile_runs_under_honcho_start_and_stops_on_sigterm(
    tmp_path: Path, redis_url: str, prefix: str, database_url: str, staging: Staging
) -> None:
    assert {line.split(":", 1)[0] for line in PROCFILE.read_text().splitlines() if line.strip()} == {
        "web",
        "worker",
        "latelane",
        "watcher",
    }
    root = tmp_path / "root"
    root.mkdir()
    port = free_port()
    marker = f"SIDECAR_REDIS_PREFIX={prefix}"

    honcho = Honcho(honcho_env(redis_url, prefix, database_url, root, port), tmp_path)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:

        def healthy() -> bool:
            assert honcho.proc.poll() is None, f"honcho exited with {honcho.proc.returncode}:\n{honcho.log()}"
            honcho.look()
            try:
                return bool(http.get("/healthz").json() == {"status": "ok"})
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=STARTUP_TIMEOUT, interval=0.2, what="GET /healthz")

        datasets = {"dataset://deploy": {"domain": "manufacturing", "machine": "press-04"}}
        versions = {"dataset://deploy/v1": {"sample_count": 4700, "shift": "night", "defect_rate": 0.002}}
        write_reference_file(root / "exec-deploy" / "valohai.metadata.jsonl", datasets, versions)

        def staged() -> bool:
            raw = staging.load_state("exec-deploy/valohai.metadata.jsonl")
            return raw is not None and json.loads(raw)["line"] == 2

        wait_until(staged, timeout=DEADLINE, what="both lines staged by the watcher")
        event = {
            "type": "dataset_version_created",
            "data": {"dataset": {"name": "deploy"}, "version": {"name": "v1", "uri": "dataset://deploy/v1"}},
        }
        response = http.post("/webhooks/events", json=event)  # no SIDECAR_WEBHOOK_SECRET: unsigned
        assert response.status_code == 202, response.text
        assert set(response.json()["due"]) == {"dataset://deploy/v1", "dataset://deploy"}

        def applied() -> dict[str, Any] | None:
            found = version_page(http, "deploy", "v1")
            if found is not None:
                assert found["status"] == "completed", found
                assert found["properties"] == versions["dataset://deploy/v1"], found
            return found

        found = wait_until(applied, timeout=DEADLINE, what=f"version applied by the worker\n{honcho.log()}")
        assert found["uri"] == "dataset://deploy/v1"
        wait_until(
            lambda: dataset_properties(http, "deploy") == datasets["dataset://deploy"],
            timeout=DEADLINE,
            what="dataset properties applied",
        )

        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        checks = {"redis": "ok", "database": "ok", "watcher": "ok"}
        quarantined = {"count": 0, "targets": []}
        assert ready.json() == {"status": "ready", "checks": checks, "quarantined": quarantined}
        assert any(h["role"] == "worker" for h in staging.heartbeats()), "no worker heartbeat"
        http.close()
        stop_and_check(honcho, marker)
    finally:
        http.close()
        honcho.close(marker)


def stop_and_check(honcho: Honcho, marker: str) -> None:
    """SIGTERM to honcho alone (it forwards it); it exits 143 and leaves nothing running."""
    running = still_running(honcho.look())
    assert honcho.parts() == {"serve", "worker", "watch"}, honcho.seen
    # The stray check below is not vacuous: it finds every process honcho started.
    assert set(running) <= set(processes_with_env(marker)), (running, processes_with_env(marker))
    assert honcho.proc.poll() is None, f"honcho exited early with {honcho.proc.returncode}:\n{honcho.log()}"
    honcho.proc.send_signal(signal.SIGTERM)
    try:
        code = honcho.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"honcho did not exit within 60 s of SIGTERM:\n{honcho.log()}")
    output = honcho.log()
    assert code == HONCHO_SIGTERM_CODE, f"honcho exited with {code}:\n{output}"
    assert "SIGTERM received" in output, output

    def all_gone() -> bool:
        left = still_running(running)
        assert not left, f"still running after honcho exited: {left}"
        strays = processes_with_env(marker)
        assert not strays, f"processes of this test still running: {strays}"
        return True

    wait_until(all_gone, timeout=15, what="no process left behind")

    if "sending SIGKILL" in output:
        # Honcho gives its processes 5 s; on a very busy machine one may need longer. That is
        # honcho's deadline, not a wrong result: everything is gone all the same.
        print(f"honcho had to SIGKILL after its 5 s grace period:\n{output}")
        return
    # Each part shut down by itself, the way it does on SIGTERM.
    assert "watcher stopped:" in output, output
    assert "Finished server process" in output, output
    assert "Warm shutdown" in output, output
