"""Bad input, tried: random bytes, huge lines, deep nesting, invalid UTF-8, NUL bytes, near-valid
lines, and symbolic links that point outside the root, fed to the ingest path in random chunks.

Known-good lines (each with a unique marker) are interleaved with hypothesis-generated garbage; the
file is written in random chunks with an ingest after each (so lines are often cut in half), the
execution is completed and the file ingested once more (the last line may lack its newline). Then:
no exception escaped, every good line is staged exactly once and in file order, every bad line is
one reject, nothing outside the root was opened or staged, and the checkpoint covers the file.
The watcher's own paths (full scan, and events naming the links) are driven the same way.

Hypothesis reuses function-scoped fixtures across examples, so each example gets its own Redis
key prefix and folder, and deletes its keys itself.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from worker.errors import InvalidEntry
from worker.ingest import Ingestor
from worker.keys import Keys
from worker.records import Source, parse_datum_object
from worker.settings import Settings
from worker.staging import Staging
from worker.uris import Target
from worker.watch import Watcher

pytestmark = pytest.mark.redis

LIMIT = 4096
EXECUTION = "exec-fuzz"
VERSION = Target("version", "fuzz", "v1")
DATASET = Target("dataset", "fuzz")
SECRET = "secret-outside-the-root"
_examples = itertools.count()
# More examples for a longer hunt: SIDECAR_FUZZ_EXAMPLES=2000 (CI keeps the default, a few seconds).
EXAMPLES = int(os.environ.get("SIDECAR_FUZZ_EXAMPLES", "100"))


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """Nothing here touches the database: one backend is enough."""
    return f"sqlite:///{tmp_path / 'unused.db'}"


# -- lines ----------------------------------------------------------------------------------------


def good_line(marker: int, variant: int) -> bytes:
    """A valid line carrying `good-<marker>`; variants: version/dataset line, odd but legal values."""
    value: Any = [marker, "ünïcødé", {"nested": {"x": None}}, "sep\u2028inside", "é" * 50][variant % 5]
    if variant % 2:
        doc = {"dataset": DATASET.key, "metadata": {f"good-{marker}": value}}
    else:
        doc = {"dataset-version": VERSION.key, "metadata": {f"good-{marker}": value}}
    ending = b"\r\n" if variant % 3 == 0 else b"\n"
    return orjson.dumps(doc) + ending


def _v(meta: bytes) -> bytes:
    return b'{"dataset-version": "' + VERSION.key.encode() + b'", "metadata": ' + meta + b"}"


near_valid = st.sampled_from(
    [
        _v(b'{"valohai.size": 1}'),  # reserved key
        _v(b'{"": 1}'),  # empty key
        _v(b'{"' + b"k" * 257 + b'": 1}'),  # key too long
        _v(b"[1, 2]"),  # metadata not an object
        _v(b'{"a": 1}, "extra": 1'),  # additional property
        b'{"dataset-version": "dataset://fuzz/latest", "metadata": {"a": 1}}',
        b'{"dataset-version": "dataset://fu zz/v1", "metadata": {"a": 1}}',
        b'{"dataset-version": "dataset://fuzz/v1/x", "metadata": {"a": 1}}',
        b'{"dataset": "dataset://fuzz/v1", "metadata": {"a": 1}}',
        b'{"file": "../../etc/passwd", "metadata": {"a": 1}}',
        b'{"file": "/abs", "metadata": {"a": 1}}',
        _v(b'{"nul\x00": 1}'),  # a raw NUL inside a string is not JSON
        _v(b'{"a": "nul\\u0000"}'),  # an escaped one is, but no database can store it
        _v(b'{"a": 1e999999}'),
        _v(b'{"a": NaN}'),
        b"[]",
        b"null",
        b'"just a string"',
        b"{",
    ]
)
garbage = st.one_of(
    st.binary(max_size=300),  # random bytes, newlines and all
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(LIMIT + 1, 3 * LIMIT).map(lambda n: _v(b'{"huge": "' + b"x" * n + b'"}')),  # valid but huge
    st.integers(LIMIT - 40, LIMIT + 40).map(lambda n: b"y" * n),  # around the limit
    st.integers(33, 1900).map(lambda d: _v(b'{"deep": ' + b"[" * d + b"]" * d + b"}")),  # too deep
    st.integers(33, 600).map(lambda d: _v(b'{"deep": ' + b'{"a": ' * d + b"1" + b"}" * d + b"}")),
    st.binary(min_size=1, max_size=40).map(lambda b: _v(b'{"bad": "\xff\xfe' + b + b'"}')),  # invalid UTF-8
    st.integers(1, 100).map(lambda n: b"\x00" * n),  # NUL bytes
    st.sampled_from([b"\r", b"\r\r", b" \t ", b"\xef\xbb\xbf{}", b"\x1b[31m"]),
    near_valid,
)
# A piece is a good line (None: its marker is given when the file is built) or a garbage line.
pieces = st.lists(st.one_of(st.none(), garbage), min_size=1, max_size=25)


def build(drawn: list[bytes | None], variants: list[int], drop_last_newline: bool) -> tuple[bytes, list[int]]:
    """The file's bytes and the markers of its good lines, in file order."""
    parts: list[bytes] = []
    markers: list[int] = []
    for i, piece in enumerate(drawn):
        if piece is None:
            markers.append(i)
            parts.append(good_line(i, variants[i % len(variants)]))
        else:
            parts.append(piece + b"\n")  # garbage may hold newlines, but never runs into a good line
    data = b"".join(parts)
    if drop_last_newline:
        data = data.removesuffix(b"\n").removesuffix(b"\r")
    return data, markers


def expected_rejects(data: bytes, good: set[bytes]) -> int:
    """Bad lines, the way a reader counts them: blank lines are nothing, an over-long line is one."""
    count = 0
    lines = data.split(b"\n")
    for n, line in enumerate(lines):
        raw = line if n == len(lines) - 1 else line.removesuffix(b"\r")
        if len(raw) > LIMIT or (raw.strip() and raw not in good):
            count += 1
    return count


# -- the reads: record every file and folder actually opened ----------------------------------------


@contextmanager
def recording_opens() -> Iterator[list[str]]:
    """Patch os.open and os.scandir to record the real path of everything they opened."""
    opened: list[str] = []
    real_open, real_scandir = os.open, os.scandir

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, *args, **kwargs)
        opened.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return fd

    def scandir_(path: Any = ".") -> Any:
        it = real_scandir(path)
        opened.append(os.path.realpath(path))
        return it

    with mock.patch.object(os, "open", open_), mock.patch.object(os, "scandir", scandir_):
        yield opened


def make_links(root: Path, outside: Path) -> list[Path]:
    """Links out of the root, where the watcher would look; returns the sidecar paths they create."""
    outside.mkdir()
    secret = orjson.dumps({"dataset-version": VERSION.key, "metadata": {SECRET: 1}}) + b"\n"
    (outside / "valohai.metadata.jsonl").write_bytes(secret)
    (outside / "out.metadata.json").write_bytes(orjson.dumps({SECRET: 1}))
    (outside / "deeper").mkdir()
    (outside / "deeper" / "valohai.metadata.jsonl").write_bytes(secret)
    (root / "exec-link").symlink_to(outside, target_is_directory=True)  # a linked execution folder
    real = root / EXECUTION
    (real / "linked-sub").symlink_to(outside, target_is_directory=True)  # a linked folder inside one
    (root / "exec-files").mkdir()
    (root / "exec-files" / "valohai.metadata.jsonl").symlink_to(outside / "valohai.metadata.jsonl")
    (root / "exec-files" / "out.metadata.json").symlink_to(outside / "out.metadata.json")
    (root / "exec-rel").mkdir()
    relative = Path("..") / ".." / "outside" / "valohai.metadata.jsonl"  # relative to root/exec-rel
    (root / "exec-rel" / "valohai.metadata.jsonl").symlink_to(relative)
    return [
        root / "exec-link" / "valohai.metadata.jsonl",
        root / "exec-link" / "out.metadata.json",
        root / "exec-link" / "deeper" / "valohai.metadata.jsonl",
        real / "linked-sub" / "out.metadata.json",
        root / "exec-files" / "valohai.metadata.jsonl",
        root / "exec-files" / "out.metadata.json",
        root / "exec-rel" / "valohai.metadata.jsonl",
    ]


def staged(staging: Staging, target: Target) -> list[dict[str, Any]]:
    return [entry.metadata for _, entry in staging.read_after(target, None)]


def clean(client: redis.Redis, keys: Keys) -> None:
    for key in client.scan_iter(match=keys.pattern(), count=1000):
        client.delete(key)


@hsettings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    drawn=pieces,
    variants=st.lists(st.integers(0, 29), min_size=1, max_size=5),
    drop_last_newline=st.booleans(),
    batch_bytes=st.sampled_from([64, 1000, 1 << 20]),
    data=st.data(),
)
def test_garbage_never_crashes_never_leaves_the_root_and_good_lines_land_once(
    settings: Settings,
    redis_client: redis.Redis,
    prefix: str,
    tmp_path: Path,
    drawn: list[bytes | None],
    variants: list[int],
    drop_last_newline: bool,
    batch_bytes: int,
    data: st.DataObject,
) -> None:
    keys = Keys(f"{prefix}-{next(_examples)}")
    staging = Staging(redis_client, keys)
    base = Path(tempfile.mkdtemp(dir=tmp_path))
    root, outside = base / "root", base / "outside"
    (root / EXECUTION).mkdir(parents=True)
    links = make_links(root, outside)
    content, markers = build(drawn, variants, drop_last_newline)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(content)), max_size=8), label="cuts"))
    path = root / EXECUTION / "valohai.metadata.jsonl"
    ingestor = Ingestor(root, staging, line_limit=LIMIT, batch_bytes=batch_bytes)
    sent: list[str] = []
    watcher = Watcher(replace(settings, root=root, line_limit=LIMIT), staging, sent.append, threading.Event())
    try:
        with recording_opens() as opened:
            start = 0
            for cut in [*cuts, len(content)]:
                with open(path, "ab") as f:
                    f.write(content[start:cut])
                start = cut
                ingestor.ingest(path)  # lines cut in half are held, never staged in pieces
                for link in links:
                    assert ingestor.ingest(link).files == 0, link
            watcher.scan()
            for link in links:
                watcher.dirty.add(link)
            watcher.dirty.add_folder(root / "exec-link")
            watcher.dirty.add_folder(root / EXECUTION / "linked-sub")
            watcher._drain()
            staging.complete_execution(EXECUTION)
            ingestor.ingest(path)  # the execution is done: a last line without newline counts now
            watcher.scan()
            watcher._drain()

        outside_real = os.path.realpath(outside)
        leaked = [p for p in opened if p == outside_real or p.startswith(outside_real + os.sep)]
        assert not leaked, f"opened outside the root: {leaked}"
        assert opened, "the recorder saw nothing: the patch did not take"

        lines = {i: good_line(i, variants[i % len(variants)]) for i in markers}
        docs = {i: orjson.loads(line) for i, line in lines.items()}
        # Each good line exactly once, in file order.
        assert staged(staging, VERSION) == [d["metadata"] for d in docs.values() if "dataset-version" in d]
        assert staged(staging, DATASET) == [d["metadata"] for d in docs.values() if "dataset" in d]
        streams = {k.decode() for k in redis_client.scan_iter(match=f"{keys.tag}:stream:*")}
        assert streams <= {keys.stream(VERSION), keys.stream(DATASET)}, streams

        good = {line.removesuffix(b"\n").removesuffix(b"\r") for line in lines.values()}
        rejects = staging.rejects(limit=10_000)
        assert len(rejects) == expected_rejects(content, good)
        assert {r.file for r in rejects} <= {f"{EXECUTION}/valohai.metadata.jsonl"}
        offsets = {os.fsdecode(k): orjson.loads(v) for k, v in redis_client.hgetall(keys.offsets).items()}
        assert set(offsets) == {f"{EXECUTION}/valohai.metadata.jsonl"}
        assert offsets[f"{EXECUTION}/valohai.metadata.jsonl"]["offset"] == len(content)
        assert all(SECRET not in str(m) for m in staged(staging, VERSION))
        assert not watcher.dirty.paths
        assert set(sent) <= {VERSION.key, DATASET.key, Target.for_execution(EXECUTION).key}
    finally:
        clean(redis_client, keys)


per_output_content = st.one_of(
    st.binary(max_size=300),
    garbage,
    st.dictionaries(
        st.text(max_size=8), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5) | st.none(), max_size=4
    ).map(orjson.dumps),
    st.just(b'{"valohai.dataset-versions": ["dataset://fuzz/v1"], "camera": "top"}'),
    st.just(b'{"valohai.dataset-versions": "not a list"}'),
)


@hsettings(
    max_examples=max(1, EXAMPLES * 4 // 5),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(contents=st.lists(per_output_content, min_size=1, max_size=3))
def test_per_output_files_with_garbage_end_in_exactly_one_outcome(
    redis_client: redis.Redis, prefix: str, tmp_path: Path, contents: list[bytes]
) -> None:
    """`<output>.metadata.json` holding anything, rewritten a few times while the execution runs:
    no exception; only an over-limit file is rejected early; once the execution completes, the last
    content is staged (if valid) or rejected, and reading again changes nothing."""
    keys = Keys(f"{prefix}-{next(_examples)}")
    staging = Staging(redis_client, keys)
    root = Path(tempfile.mkdtemp(dir=tmp_path)) / "root"
    path = root / EXECUTION / "images" / "a.png.metadata.json"
    rel = str(path.relative_to(root))
    path.parent.mkdir(parents=True)
    ingestor = Ingestor(root, staging, line_limit=LIMIT)
    execution = Target.for_execution(EXECUTION)
    try:
        for content in contents:
            path.write_bytes(content)
            ingestor.ingest(path)
        # Early rejects: an over-limit file, or a whole document with a bad version item (staged
        # at once without that item, and rejected for it).
        assert len(staging.rejects()) <= sum(len(c) > LIMIT or bad_items(c) for c in contents)
        staging.complete_execution(EXECUTION)
        ingestor.ingest(path)
        outcome = (staged(staging, execution), staging.rejects())
        ingestor.ingest(path)  # unchanged: nothing more
        assert (staged(staging, execution), staging.rejects()) == outcome
        last = contents[-1]
        try:
            valid = len(last) <= LIMIT and bool(parse_datum_object(last, "images/a.png", Source("sidecar")))
        except InvalidEntry:
            valid = False
        if valid:
            assert outcome[0] and outcome[0][-1] == orjson.loads(last)
        else:
            assert outcome[1] and outcome[1][0].file == rel
    finally:
        clean(redis_client, keys)


def bad_items(content: bytes) -> bool:
    """True if a per-output file parses and only its `valohai.dataset-versions` items are bad."""
    problems: list[str] = []
    try:
        parse_datum_object(content, "images/a.png", Source("sidecar"), problems)
    except InvalidEntry:
        return False
    return bool(problems)


def test_counting_helper_agrees_with_itself() -> None:
    """The oracle for rejects: blank and \\r-only lines are nothing; over-long lines count once."""
    good = {b"G"}
    assert expected_rejects(b"G\n\n \r\nbad\n" + b"z" * (LIMIT + 1) + b"\n", good) == 2
    assert expected_rejects(b"G\r\n" + b" " * LIMIT + b"\r\n", good) == 0
    assert expected_rejects(b" " * (LIMIT + 1) + b"\r\n", good) == 1
    assert Counter(build([None, b"x", None], [0, 1], False)[1]) == Counter([0, 2])
