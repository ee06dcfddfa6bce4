"""The `sidecar` command: parse flags, build settings, call one function."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy.exc

from . import __version__, connections, definitions_cli, deliveries_cli, explore_cli
from .edge import MAX_REQUEST_HEAD, exposure_warning
from .errors import ConfigError, SidecarError
from .props_cli import add_commands
from .settings import Settings
from .staging import RedisConnectionError, RedisError, Staging
from .status import cmd_status
from .store.migrate import upgrade
from .tasks import Enqueuer, make_app
from .uris import Target, version_target

log = logging.getLogger("sidecar")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    flags = {k: v for k, v in vars(args).items() if k in _SETTING_FLAGS}
    try:
        settings = Settings.load(flags)
        _logging(settings.log_level, settings.log_format)
        result: int = args.run(settings, args)
        return result
    except SidecarError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    except RedisConnectionError as exc:
        print(f"sidecar: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    except sqlalchemy.exc.OperationalError as exc:
        first_line = str(exc.orig or exc).strip().splitlines()[0]
        print(f"sidecar: cannot use the database: {first_line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# -- commands ---------------------------------------------------------------------------------


def _freeze_startup_objects() -> None:
    """Take what a long-running command built at start out of the cycle collector's sight.

    Modules, classes and settings (~100,000 objects once Celery, SQLAlchemy and watchdog are
    imported) live as long as the process, yet every full collector pass walked all of them:
    ~70 ms on a 2-core machine, a stall wherever a pass came, in the middle of the watcher's loop
    too. Frozen, they are never walked again; what is made later is collected as before. Before
    a fork (Celery's prefork pool) it also keeps the children from copying the pages of these
    objects (Python's `gc.freeze` documentation).
    """
    gc.collect()
    gc.freeze()


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from .up import run_up

    return run_up(settings, concurrency=args.concurrency)


def cmd_watch(settings: Settings, args: argparse.Namespace) -> int:
    from .watch import Watcher

    _serve_metrics(args.metrics_port)
    staging = connections.staging(settings)
    stop = _stop_on_signals()
    watcher = Watcher(settings, staging, Enqueuer(make_app(settings)), stop)
    _freeze_startup_objects()
    watcher.run()
    log.info(
        "watcher stopped: %d files read, %d lines, %d rejects",
        watcher.stats.files,
        watcher.stats.lines,
        watcher.stats.rejects,
    )
    return 0


def _worker_queues(app: Any, names: str) -> list[str]:
    """The broker queues of `--queues` ("apply", "bulk" or both, comma-separated)."""
    known = {"apply": app.conf.task_default_queue, "bulk": app.conf.sidecar_bulk_queue}
    asked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in asked if n not in known]
    if unknown or not asked:
        raise ConfigError("--queues", f"{names!r}: name apply, bulk or both (comma-separated)")
    return [known[n] for n in dict.fromkeys(asked)]


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    app = make_app(settings)
    queues = _worker_queues(app, args.queues)
    if args.migrate:
        upgrade(connections.engine(settings))
    _serve_metrics(args.metrics_port)
    name = f"sidecar-{os.getpid()}@{socket.gethostname()}"
    _heartbeat_thread(
        connections.staging(settings),
        name,
        {"concurrency": args.concurrency, "pool": args.pool, "queues": queues},
    )
    _freeze_startup_objects()  # before Celery forks a prefork pool, too (see its docstring)
    _quiet_celery()
    from celery.signals import worker_ready

    @worker_ready.connect
    def _ready(**_: Any) -> None:
        log.info(
            "worker %s ready: pool %s, concurrency %d, queues %s, broker %s",
            name,
            args.pool,
            args.concurrency,
            " and ".join(queues),
            _scheme(app.conf.broker_url),
        )

    # The threads pool by default: applies wait on the database and Redis, not on the CPU, and
    # one process keeps the metrics in one registry. SIGTERM is Celery's warm shutdown: running
    # applies finish; unacknowledged ones are redelivered (acks_late) or swept.
    app.worker_main(
        [
            "--quiet",  # celery's own option, before the sub-command: no banner (see `_ready`)
            "worker",
            "--loglevel",
            settings.log_level,
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(args.concurrency),
            "--pool",
            args.pool,
            "--hostname",
            name,
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def _quiet_celery() -> None:
    """Celery's root-user SecurityWarning is for prefork pools run as root by accident; in a
    container the sidecar is often root on purpose, and the warning (a multi-line message on
    stderr at every start) tells a person nothing they can act on here."""
    warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")


def _scheme(url: Any) -> str:
    """A broker URL without its credentials: its scheme only."""
    return str(url).split("://", 1)[0] if url else "?"


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from .api import create_app

    _check_exposure(settings, insecure=args.insecure)
    engine = connections.engine(settings)
    if args.migrate:
        upgrade(engine)
    enqueue = Enqueuer(make_app(settings))
    app = create_app(
        engine,
        connections.staging(settings),
        enqueue,
        recheck=enqueue.recheck,
        bulk_edit=enqueue.bulk_edit,
        bulk_limit=settings.bulk_limit,
        webhook_secret=settings.webhook_secret,
        api_token=settings.api_token,
        watcher_max_age=3 * settings.rescan_interval + 30,
        allowed_origins=settings.allowed_origins,
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT and then re-raises the signal to the handler
    # that was installed before it started; with this one a clean stop exits 0, not 143, so
    # supervisors (honcho, compose, systemd) tell a stop from a crash.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    _freeze_startup_objects()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
    )
    return 0


def _check_exposure(settings: Settings, *, insecure: bool) -> None:
    """Warn about a non-loopback bind with no API token; refuse it unless `--insecure`."""
    problem = exposure_warning(settings.host, settings.api_token)
    if problem is None:
        return
    if not insecure:
        raise ConfigError("SIDECAR_API_TOKEN", f"{problem}; set a token, or pass --insecure to serve anyway")
    log.warning("%s (--insecure)", problem)


def _exit_cleanly(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def cmd_complete(settings: Settings, args: argparse.Namespace) -> int:
    target = version_target(args.uri)
    staging = connections.staging(settings)
    enqueue = Enqueuer(make_app(settings))
    due = staging.complete_version(target)
    enqueue.many(due)
    print(f"completed {target.key}; apply enqueued for {', '.join(due)}")
    return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from .store import quarantine
    from .tasks import retry_targets

    staging = connections.staging(settings)
    engine = connections.engine(settings)
    held = set(staging.quarantined()) | set(quarantine.listed(engine))
    if args.all:
        targets = sorted(held)
    elif args.uri:
        targets = [Target.parse(args.uri).key]  # BadURI names what is wrong with it
    else:
        print("sidecar retry: give a target (URI or execution:<id>) or --all", file=sys.stderr)
        return 2
    unknown = [t for t in targets if t not in held]
    if unknown:
        print(f"sidecar retry: not quarantined: {', '.join(unknown)}", file=sys.stderr)
        return 1
    retry_targets(engine, staging, Enqueuer(make_app(settings)), targets)
    engine.dispose()
    print(
        f"released {len(targets)} quarantined target(s); applies enqueued"
        if targets
        else "nothing quarantined"
    )
    return 0


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from .ingest import Ingestor
    from .replay import replay, sidecar_files, terminal_progress

    root = settings.require_root().resolve()
    files = sidecar_files(root, [Path(p) for p in args.paths], args.execution)
    version = version_target(args.dataset_version) if args.dataset_version else None
    staging = connections.staging(settings)
    engine = connections.engine(settings)
    ingestor = Ingestor(root, staging, line_limit=settings.line_limit)
    summary = replay(
        engine, staging, ingestor, files, version=version, dry_run=args.dry_run, progress=terminal_progress()
    )
    for change in summary.changes:
        print(change)
    print(summary.report(args.dry_run))
    engine.dispose()
    return 1 if summary.rejects else 0


def cmd_rejects(settings: Settings, args: argparse.Namespace) -> int:
    rejects = connections.staging(settings).rejects(args.limit)
    if args.json:
        print(json.dumps([r.__dict__ for r in rejects], indent=2))
        return 0
    for r in rejects:
        print(f"{r.at}  {r.file}:{r.line} (offset {r.offset})  {r.reason}")
    if not rejects:
        print("no rejects")
    return 0


def cmd_db_upgrade(settings: Settings, _args: argparse.Namespace) -> int:
    upgrade(connections.engine(settings))
    print("database schema is at the newest revision")
    return 0


# -- plumbing ---------------------------------------------------------------------------------

_SETTING_FLAGS = {
    "root",
    "data_dir",
    "database_url",
    "redis_url",
    "broker_url",
    "host",
    "port",
    "polling",
    "log_level",
    "rescan_interval",
    "log_format",
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", help="state folder (SQLite, private Redis) [SIDECAR_DATA_DIR, ./.sidecar]"
    )
    parser.add_argument(
        "--database-url", help="SQLAlchemy URL [SIDECAR_DATABASE_URL, SQLite in the data dir]"
    )
    parser.add_argument("--redis-url", help="Redis URL [SIDECAR_REDIS_URL, the private one of `sidecar up`]")
    parser.add_argument(
        "--broker-url", help="Celery broker: redis:// or amqp:// [SIDECAR_BROKER_URL, the staging Redis]"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING [SIDECAR_LOG_LEVEL, INFO]")
    parser.add_argument("--log-format", choices=["text", "json"], help="[SIDECAR_LOG_FORMAT, text]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands")

    def command(
        name: str, run: Callable[[Settings, argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _common(p)
        p.set_defaults(run=run)
        return p

    def watching(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", help="folder of execution folders [SIDECAR_ROOT]")
        p.add_argument(
            "--polling",
            action="store_true",
            default=None,
            help="poll instead of inotify (network filesystems) [SIDECAR_POLLING]",
        )
        p.add_argument("--rescan-interval", type=float, help="seconds between full scans [30]")

    def serving(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="HTTP bind address [SIDECAR_HOST, 127.0.0.1]")
        p.add_argument("--port", type=int, help="HTTP port [SIDECAR_PORT, 8000]")

    up = command("up", cmd_up, "run everything on one machine: Redis, watcher, worker, HTTP server")
    up.description = (
        "Run everything on one machine, as child processes of this one: a private Redis (staging and "
        "the apply queue; its append-only files in --data-dir), `sidecar watch` on --root (reads "
        "sidecar files, stages their lines), `sidecar worker` (a Celery worker that applies completed "
        "versions; with --root, reads datums' checksums) and `sidecar serve` (the API, webhooks and "
        "pages on --host:--port). The database is SQLite at <data-dir>/sidecar.db unless "
        "SIDECAR_DATABASE_URL says otherwise; metrics of every part are at /metrics. Ctrl-C stops all."
    )
    watching(up)
    serving(up)
    up.add_argument("--concurrency", type=int, default=2, help="applies at once [2]")
    watch = command("watch", cmd_watch, "watch a root and stage sidecar files in Redis")
    watching(watch)
    worker = command("worker", cmd_worker, "run a Celery worker that applies completed versions")
    worker.add_argument("--concurrency", type=int, default=2, help="applies at once [2]")
    worker.add_argument("--pool", default="threads", help="Celery pool: threads, prefork, solo [threads]")
    worker.add_argument(
        "--queues",
        default="apply,bulk",
        help="what to take: apply (late lines, single completions, API writes), bulk (batched "
        "applies, drains, bulk edits, checksums, re-checks) or both [apply,bulk]",
    )
    worker.add_argument(
        "--root", help="the executions' root, to read datums' size and checksums [SIDECAR_ROOT]"
    )
    serve = command("serve", cmd_serve, "run the HTTP server (API and webhooks)")
    serving(serve)
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve on a non-loopback address even without SIDECAR_API_TOKEN",
    )
    for p in (worker, serve):
        p.add_argument("--migrate", action="store_true", help="upgrade the database schema first")
    for p in (worker, watch):
        p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT")
    complete = command("complete", cmd_complete, "mark a dataset version as completed and apply it")
    complete.add_argument("uri", help="dataset://<name>/<version>")
    retry = command("retry", cmd_retry, "put quarantined targets back and apply them again")
    retry.add_argument("uri", nargs="?", help="dataset://<name>[/<version>] or execution:<id>")
    retry.add_argument("--all", action="store_true", help="every quarantined target")
    replay = command(
        "replay", cmd_replay, "read sidecar files again from the start; stage and apply what was missed"
    )
    replay.add_argument("--root", help="folder of execution folders [SIDECAR_ROOT]")
    replay.add_argument("paths", nargs="+", metavar="PATH", help="sidecar files or folders under the root")
    replay.add_argument("--execution", help="only this execution's files")
    replay.add_argument("--dataset-version", help="only files that name this dataset://<name>/<version>")
    replay.add_argument(
        "--dry-run", action="store_true", help="print what would change, key by key; change nothing"
    )
    rejects = command("rejects", cmd_rejects, "list rejected lines, newest first")
    rejects.add_argument("--limit", type=int, default=100)
    rejects.add_argument("--json", action="store_true")
    add_commands(sub, _common)
    explore_cli.add_commands(sub, _common)
    definitions_cli.add_commands(sub, _common)
    deliveries_cli.add_commands(sub, _common)
    status = command("status", cmd_status, "backlog, watchers and workers; exit 1 when something is stuck")
    status.add_argument("--json", action="store_true")
    status.add_argument(
        "--stuck-after", type=float, default=300.0, help="seconds before a wait is stuck [300]"
    )
    db = sub.add_parser("db", help="database schema").add_subparsers(title="db commands")
    upgrade = db.add_parser("upgrade", help="create or upgrade the database schema")
    _common(upgrade)
    upgrade.set_defaults(run=cmd_db_upgrade)
    return parser


def _serve_metrics(port: int | None) -> None:
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr="127.0.0.1")
        log.info("metrics on http://127.0.0.1:%d/metrics", port)


def _heartbeat_thread(staging: Staging, name: str, info: dict[str, Any]) -> None:
    """A worker's heartbeat for `sidecar status`, every few seconds, until the process ends."""

    def beat() -> None:
        while True:
            try:
                staging.beat("worker", name, info, ttl=30)
            except RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            time.sleep(5)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


if __name__ == "__main__":
    sys.exit(main())
