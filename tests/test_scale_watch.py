"""2,000 execution folders appearing at once, an inotify queue that overflows, and a watcher
SIGKILLed again and again while its files are being appended to.

These tests only need the watcher and Redis. The first runs the `Watcher` in a thread (like
tests/test_watch.py) while a separate process creates 2,000 execution folders, each with a
`valohai.metadata.jsonl`, as fast as it can. The second runs a real `sidecar watch` whose inotify
queue holds 16 events (`fs.inotify.max_queued_events` is shrunk while its inotify instance is
created, restored right after, and again in a `finally`), stops it with SIGSTOP while the folders
appear, so that the kernel queue overflows for certain (not by timing), and lets the periodic rescan
(1 s) find the rest; then appends to every file, flooding the small queue again. Either way every
line of every file must be staged exactly once: each file's checkpoint covers the file, and each
version's stream holds exactly the expected entries.

If /proc/sys cannot be written, the default queue is flooded instead (more distinct events than it
holds, created while the watcher is stopped), and completeness is asserted all the same.

The third runs a real `sidecar watch` while a thread appends numbered lines to four files (bursts
of up to thousands of lines, and lines written in two pieces), and SIGKILLs the watcher at random
moments, restarting it each time. Each file feeds a version of its own, so the version's stream must
hold exactly the file's lines: none lost, none twice, none out of order, none staged in pieces.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from tests.e2e_helpers import wait_until
from tests.soak_oracle import Sidecar, unstaged
from worker.settings import Settings
from worker.staging import Staging
from worker.uris import Target
from worker.watch import Watcher

# Each wait has its own generous deadline (DEADLINE); the test as a whole may take several.
pytestmark = [pytest.mark.redis, pytest.mark.timeout(600)]

FOLDERS = 2000
VERSIONS = 8
DEADLINE = 150.0
QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")

# Run in a separate process, so the folders appear as fast as the filesystem allows and the
# watcher's thread does not slow the writer down. argv: root, count, phase ("create" / "append").
WRITER = textwrap.dedent(
    """
    import json, os, sys
    root, count, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    def line(i, n):
        doc = {"dataset-version": f"dataset://scale/v{i % %(versions)d}", "metadata": {f"e{i}.l{n}": n}}
        return (json.dumps(doc) + "\\n").encode()
    for i in range(count):
        folder = os.path.join(root, f"exec-{i:05d}")
        if phase == "create":
            os.mkdir(folder)
            with open(os.path.join(folder, "valohai.metadata.jsonl"), "wb") as f:
                f.write(line(i, 1) + line(i, 2))
        else:
            with open(os.path.join(folder, "valohai.metadata.jsonl"), "ab") as f:
                f.write(line(i, 3))
    """
).replace("%(versions)d", str(VERSIONS))


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """The watcher never touches the database: one backend is enough here."""
    return f"sqlite:///{tmp_path / 'unused.db'}"


def write_folders(root: Path, phase: str, count: int = FOLDERS) -> None:
    subprocess.run([sys.executable, "-c", WRITER, str(root), str(count), phase], check=True, timeout=DEADLINE)


def expected_lines(lines_per_file: int) -> dict[str, Counter[tuple[str, str]]]:
    """Per version: (execution, key) of every line the writer wrote, each once."""
    out: dict[str, Counter[tuple[str, str]]] = {}
    for i in range(FOLDERS):
        version = f"dataset://scale/v{i % VERSIONS}"
        for n in range(1, lines_per_file + 1):
            out.setdefault(version, Counter())[(f"exec-{i:05d}", f"e{i}.l{n}")] += 1
    return out


def staged_lines(staging: Staging) -> dict[str, Counter[tuple[str, str]]]:
    out: dict[str, Counter[tuple[str, str]]] = {}
    for v in range(VERSIONS):
        target = Target("version", "scale", f"v{v}")
        counter = out.setdefault(target.key, Counter())
        for _, entry in staging.read_after(target, None):
            for key in entry.metadata:
                counter[(entry.source.execution, key)] += 1
    return out


def all_staged(staging: Staging, root: Path) -> bool:
    """Every file's checkpoint covers the whole file."""
    missing = unstaged(staging, [root])
    assert len(list(root.glob("*/valohai.metadata.jsonl"))) == FOLDERS
    assert not missing, f"{len(missing)} files not fully staged, e.g. {missing[:3]}"
    return True


def check_streams(staging: Staging, lines_per_file: int) -> None:
    expected = expected_lines(lines_per_file)
    got = staged_lines(staging)
    for version, lines in expected.items():
        stream = staging.keys.stream(Target.parse(version))
        assert staging.redis.xlen(stream) == sum(lines.values()), version
        duplicated = [k for k, n in got[version].items() if n > 1]
        assert not duplicated, f"{version}: staged more than once: {duplicated[:5]}"
        assert got[version] == lines, f"{version}: {len(set(lines) - set(got[version]))} lines missing"


def test_2000_execution_folders_at_once_are_all_staged(settings: Settings, staging: Staging) -> None:
    root = settings.require_root()
    stop = threading.Event()
    sent: list[str] = []
    watcher = Watcher(replace(settings, rescan_interval=1.0), staging, sent.append, stop)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: watcher.last_scan > 0, timeout=DEADLINE, what="the watcher's first scan")
        write_folders(root, "create")
        wait_until(
            lambda: all_staged(staging, root), timeout=DEADLINE, interval=1.0, what="every file staged"
        )
        check_streams(staging, 2)
        assert thread.is_alive(), "the watcher thread died"
        # Each version was seen for the first time once: one apply to register it as building.
        assert sorted(set(sent)) == sorted(f"dataset://scale/v{v}" for v in range(VERSIONS))
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()


# -- the queue overflow ---------------------------------------------------------------------------


@contextlib.contextmanager
def inotify_queue(size: int) -> Iterator[tuple[bool, int, Callable[[], None]]]:
    """Shrink fs.inotify.max_queued_events (read at inotify_init only), yield (shrunk, old, restore).

    `restore()` puts the old value back (call it as soon as the watched process has its inotify
    instance: the setting is global); it is always called again on the way out, failure or not."""
    try:
        old = int(QUEUE_SYSCTL.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {QUEUE_SYSCTL} ({exc}); flooding instead")
        yield False, -1, lambda: None
        return
    shrunk = False

    def restore() -> None:
        if shrunk and int(QUEUE_SYSCTL.read_text()) != old:
            QUEUE_SYSCTL.write_text(str(old))

    try:
        try:
            QUEUE_SYSCTL.write_text(str(size))
            shrunk = int(QUEUE_SYSCTL.read_text()) == size
        except OSError as exc:
            print(f"cannot shrink the inotify queue ({exc}); flooding the default one instead")
        yield shrunk, old, restore
    finally:
        restore()
    assert int(QUEUE_SYSCTL.read_text()) == old


@pytest.mark.e2e
def test_inotify_queue_overflow_is_caught_by_the_rescan(
    settings: Settings, staging: Staging, tmp_path: Path
) -> None:
    root = settings.require_root()
    flood = root / "flood"  # a watched folder that is not an execution's: events, nothing to stage
    flood.mkdir()
    env = replace(settings, rescan_interval=1.0).as_env()
    watcher: Sidecar | None = None
    stopped = False
    try:
        with inotify_queue(16) as (shrunk, old_size, restore):
            watcher = Sidecar(["watch"], env, tmp_path / "watch.log")
            heartbeat = staging.keys.heartbeat("watcher", f"{socket.gethostname()}:{watcher.pid}")

            def started() -> bool:
                assert watcher is not None and watcher.alive(), f"exited:\n{watcher and watcher.log()}"
                return bool(staging.redis.exists(heartbeat))  # written after the observer started

            wait_until(started, timeout=DEADLINE, what="the watcher's first scan")
            restore()  # the watcher's inotify instance keeps its 16-event queue; nobody else gets one
            # While the watcher cannot read, the kernel queue fills and overflows: certain, not timed.
            watcher.proc.send_signal(signal.SIGSTOP)
            stopped = True
            write_folders(root, "create")
            flooded = 0
            if not shrunk:
                # More distinct events than the queue holds (the kernel merges only identical ones).
                flooded = old_size + 1000 if 0 < old_size <= 1 << 17 else 20_000
                for i in range(flooded):
                    (flood / f"f{i}").touch()
            watcher.proc.send_signal(signal.SIGCONT)
            stopped = False
        wait_until(lambda: all_staged(staging, root), timeout=DEADLINE, interval=1.0, what="2 lines per file")
        check_streams(staging, 2)
        # Events keep overflowing the 16-event queue while the files grow: the rescan catches up.
        write_folders(root, "append")
        wait_until(lambda: all_staged(staging, root), timeout=DEADLINE, interval=1.0, what="3 lines per file")
        check_streams(staging, 3)
        assert watcher.alive(), f"the watcher died:\n{watcher.log()[-5000:]}"
        overflowed = "Inotify queue overflowed" in watcher.log()
        print(f"queue shrunk: {shrunk}, flooded: {flooded}, overflow seen by watchdog: {overflowed}")
        if shrunk or flooded > old_size > 0:
            assert overflowed, f"expected a queue overflow:\n{watcher.log()[-5000:]}"
    finally:
        if watcher is not None:
            if stopped:
                watcher.proc.send_signal(signal.SIGCONT)
            watcher.stop()
    assert old_size < 0 or int(QUEUE_SYSCTL.read_text()) == old_size
    assert "Traceback" not in watcher.log(), watcher.log()[-5000:]


# -- the watcher SIGKILLed while files grow --------------------------------------------------------

KILLS = 6
KILL_FILES = 4


def numbered_line(execution: int, seq: int, rng: random.Random) -> bytes:
    metadata = {"seq": seq, "pad": "p" * rng.randrange(80)}
    doc = {"dataset-version": f"dataset://killw/e{execution}", "metadata": metadata}
    return (json.dumps(doc) + "\n").encode()


def append_numbered(
    root: Path, stop: threading.Event, counts: list[int], errors: list[BaseException]
) -> None:
    """Append numbered lines to every file until `stop`; each file's last line is always finished."""
    rng = random.Random()
    try:
        while not stop.is_set():
            i = rng.randrange(KILL_FILES)
            burst = rng.choice([1, 1, 3, 20, 400])
            data = b"".join(numbered_line(i, counts[i] + n, rng) for n in range(burst))
            path = root / f"exec-kill-{i}" / "valohai.metadata.jsonl"
            with open(path, "ab") as f:
                if rng.random() < 0.4:  # a line written in two pieces: held until its newline
                    cut = rng.randrange(1, len(data))
                    f.write(data[:cut])
                    f.flush()
                    time.sleep(rng.uniform(0, 0.05))
                    f.write(data[cut:])
                else:
                    f.write(data)
            counts[i] += burst
            time.sleep(rng.uniform(0, 0.02))
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def watching(watcher: Sidecar) -> bool:
    assert watcher.alive(), f"the watcher exited:\n{watcher.log()[-5000:]}"
    return "watching " in watcher.log()


@pytest.mark.e2e
def test_watcher_sigkilled_while_files_grow_loses_and_reorders_nothing(
    settings: Settings, staging: Staging, tmp_path: Path
) -> None:
    root = settings.require_root()
    for i in range(KILL_FILES):
        (root / f"exec-kill-{i}").mkdir()
        (root / f"exec-kill-{i}" / "valohai.metadata.jsonl").touch()
    env = replace(settings, rescan_interval=1.0).as_env()
    rng = random.Random()
    counts = [0] * KILL_FILES
    errors: list[BaseException] = []
    stop = threading.Event()
    writer = threading.Thread(target=append_numbered, args=(root, stop, counts, errors))
    watchers: list[Sidecar] = []
    try:
        writer.start()
        for n in range(KILLS + 1):
            watcher = Sidecar(["watch"], env, tmp_path / f"watch-{n}.log")
            watchers.append(watcher)
            wait_until(partial(watching, watcher), timeout=DEADLINE, what="the watcher started")
            if n == KILLS:
                break
            time.sleep(rng.uniform(0.05, 1.5))  # mid-read, mid-batch or idle: wherever it lands
            watcher.sigkill()
        stop.set()
        writer.join(timeout=60)
        assert not writer.is_alive() and not errors, errors
        print(f"lines per file: {counts}")

        def all_lines_staged() -> bool:
            assert watchers[-1].alive(), f"the watcher died:\n{watchers[-1].log()[-5000:]}"
            missing = unstaged(staging, [root])
            assert not missing, f"not staged yet: {missing}"
            return True

        wait_until(all_lines_staged, timeout=DEADLINE, interval=0.5, what="every line staged")
        for i in range(KILL_FILES):
            entries = [e for _, e in staging.read_after(Target("version", "killw", f"e{i}"), None)]
            seqs = [e.metadata["seq"] for e in entries]
            if seqs != list(range(counts[i])):
                dupes = sorted(s for s, c in Counter(seqs).items() if c > 1)[:5]
                lost = sorted(set(range(counts[i])) - set(seqs))[:5]
                raise AssertionError(
                    f"file {i}: {len(seqs)} entries for {counts[i]} lines; duplicated {dupes}, lost {lost}, "
                    f"in order: {seqs == sorted(seqs)}"
                )
            assert [e.source.line for e in entries] == [s + 1 for s in seqs], f"file {i}: wrong line numbers"
        assert staging.rejects() == [], "a line was staged in pieces"
        for w in watchers:
            assert "Traceback" not in w.log(), w.log()[-5000:]
    finally:
        stop.set()
        writer.join(timeout=60)
        for w in watchers:
            if w.proc.returncode is None:  # the SIGKILLed ones are reaped already: leave their pids be
                w.stop()
