"""Every limit the store has, at the limit and one past it, on SQLite and PostgreSQL.

Each case is a real file read by the real Ingestor, staged in the real Redis and applied to the
real database, between good lines; those must land whatever the case does. At the limit a value
is stored (and searchable); past it, the line is a reject naming the limit, or (nested key paths)
the value is stored whole and only left out of the search index. Before the limits were checked,
PostgreSQL failed the whole apply with a DataError on every retry (SQLite took it all).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from worker import limits
from worker.applying import apply_target
from worker.errors import InvalidEntry
from worker.ingest import Ingestor
from worker.records import Source, user_write
from worker.staging import Staging
from worker.store.index import flatten
from worker.store.models import Dataset, DatasetVersion, Datum, PropertyIndex
from worker.uris import Target

pytestmark = pytest.mark.redis

EXEC = "e" * 255  # the longest folder name Linux allows
N = limits.NAME_MAX


def _nested(levels: int, key_length: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for level in range(levels):
        value = {chr(ord("a") + level) * key_length: value}
    return value


def _deepest_path(top: str, levels: int, key_length: int) -> str:
    keys = [chr(ord("a") + level) * key_length for level in reversed(range(levels))]
    return limits.path_text([top, *keys, "leaf"])


# Nested paths: the longest that fits the index (in bytes of its JSON text), and one byte more.
FITS, PAST = "fits567890", "past5678901"
assert len(_deepest_path(FITS, 5, 300).encode()) == limits.INDEX_PATH_MAX_BYTES
assert len(_deepest_path(PAST, 5, 300).encode()) == limits.INDEX_PATH_MAX_BYTES + 1
_NESTED = _nested(5, 300)


def _v(metadata: dict[str, Any], uri: str = "dataset://ds/v1") -> dict[str, Any]:
    return {"dataset-version": uri, "metadata": metadata}


def _d(path: str, metadata: dict[str, Any]) -> dict[str, Any]:
    return {"file": path, "metadata": metadata}


P = limits.DATUM_PATH_MAX_BYTES
IN_V1 = {"valohai.dataset-versions": ["dataset://ds/v1"]}
# (name, line, accepted?) — a line is a dict, written as JSON with `ensure_ascii=False`.
CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("version name at the limit", _v({"a": 1}, f"dataset://ds/{'v' * N}"), True),
    ("version name past it", _v({"a": 1}, f"dataset://ds/{'v' * (N + 1)}"), False),
    ("dataset name at the limit", {"dataset": f"dataset://{'d' * N}", "metadata": {"a": 1}}, True),
    ("dataset name past it", {"dataset": f"dataset://{'d' * (N + 1)}", "metadata": {"a": 1}}, False),
    ("key at the limit", _v({"k" * 256: 1}), True),
    ("key past it", _v({"k" * 257: 1}), False),
    ("4-byte key at the limit", _v({"😀" * 256: 1}), True),
    ("nested path that fits the index", _v({FITS: _NESTED}), True),
    ("nested path past the index", _v({PAST: _NESTED}), True),
    ("12 levels of 250-character keys", _v({"deep": _nested(12, 250)}), True),
    ("a NUL in a value", _v({"nul": "a\u0000b"}), False),
    ("a NUL in a nested key", _v({"n": {"a\u0000": 1}}), False),
    ("64-bit integers", _v({"big": 2**64 - 1, "small": -(2**63)}), True),
    ("an integer past 64 bits (read as a double)", _v({"huge": 2**64}), True),
    ("datum path at the limit", _d("p" * P, IN_V1), True),
    ("datum path past it", _d("p" * (P + 1), {"x": 1}), False),
    ("4-byte datum path past it", _d("😀" * 513, {"x": 1}), False),
]


def _write(root: Path, lines: list[dict[str, Any]]) -> Path:
    path = root / EXEC / "valohai.metadata.jsonl"
    path.parent.mkdir(parents=True)
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def test_each_limit_and_one_past_it_with_good_lines_around(
    engine: Engine, staging: Staging, tmp_path: Path
) -> None:
    lines: list[dict[str, Any]] = []
    for number, (_, case_line, _) in enumerate(CASES):
        lines.append({"dataset-version": "dataset://ds/v1", "metadata": {f"good{number}": number}})
        lines.append(case_line)
    lines.append({"dataset-version": "dataset://ds/v1", "metadata": {"last": True}})
    path = _write(tmp_path, lines)
    stats = Ingestor(tmp_path, staging, line_limit=1024 * 1024).ingest(path)

    rejected = {r.line: r.reason for r in staging.rejects(limit=1000)}
    for number, (name, _, accepted) in enumerate(CASES):
        line = 2 * number + 2
        assert (line not in rejected) == accepted, f"{name}: {rejected.get(line)}"
        if not accepted:  # the reason names the limit, and never holds the line
            assert any(w in rejected[line] for w in ("limit", "NUL", "too long")), (name, rejected[line])
            assert len(rejected[line]) < 400
    assert stats.rejects == sum(1 for _, _, ok in CASES if not ok)

    staging.complete_execution(EXEC)  # completes every version the datums name
    for uri in ("dataset://ds/v1", f"dataset://ds/{'v' * N}"):
        staging.complete_version(Target.parse(uri))
    for key in staging.due_targets(older_than=-1):
        result = apply_target(engine, staging, Target.parse(key))
        assert not result.skipped, (key, result)

    with Session(engine) as s:
        version = s.scalar(select(DatasetVersion).where(DatasetVersion.name == "v1"))
        assert version is not None and version.status == "completed"
        props = version.properties
        for number in range(len(CASES)):
            assert props[f"good{number}"] == number
        assert props["last"] is True
        assert props["k" * 256] == 1 and props["😀" * 256] == 1
        assert props[FITS] == _NESTED and props[PAST] == _NESTED  # stored whole either way
        assert props["deep"] == _nested(12, 250)
        assert props["big"] == 2**64 - 1 and props["small"] == -(2**63) and float(props["huge"]) == 2.0**64
        assert "nul" not in props and "n" not in props
        assert s.scalar(select(DatasetVersion.id).where(DatasetVersion.name == "v" * N)) is not None
        assert s.scalar(select(Dataset.properties).where(Dataset.name == "d" * N)) == {"a": 1}
        datum = s.scalar(select(Datum).where(Datum.path == "p" * limits.DATUM_PATH_MAX_BYTES))
        assert datum is not None and datum.execution == EXEC
        paths = set(s.scalars(select(PropertyIndex.path).where(PropertyIndex.owner_id == version.id)))
    # The nested path that fits is in the index; the one past it is not (its parents are).
    assert _deepest_path(FITS, 5, 300) in paths
    assert _deepest_path(PAST, 5, 300) not in paths
    assert limits.path_text([PAST]) in paths
    assert all(len(p.encode()) <= limits.INDEX_PATH_MAX_BYTES for p in paths)


def test_the_index_leaves_out_paths_past_its_limit_and_everything_under_them() -> None:
    rows = {r.path for r in flatten({FITS: _NESTED, PAST: {"x": _NESTED}})}
    assert _deepest_path(FITS, 5, 300) in rows
    assert all(len(p.encode()) <= limits.INDEX_PATH_MAX_BYTES for p in rows)
    # Under PAST: "x" and its five levels fit; the leaf below them is 5 bytes past the limit.
    under = [p for p in rows if p.startswith(f'["{PAST}",')]
    assert len(under) == 6 and not any(p.endswith('"leaf"]') for p in under)


@pytest.mark.parametrize(
    ("metadata", "needle"),
    [
        ({"n": float("nan")}, "not finite"),
        ({"n": float("inf")}, "not finite"),
        ({"n": [1, {"m": 2**64}]}, "beyond 64 bits"),
        ({"n": -(2**63) - 1}, "beyond 64 bits"),
        ({"n": "a\x00"}, "NUL"),
        ({"n": {"\ud800": 1}}, "surrogate"),
        ({"n": "\udfff"}, "surrogate"),
    ],
)
def test_api_writes_refuse_what_the_database_cannot_hold(metadata: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidEntry, match=needle):
        user_write(Target("dataset", "ds"), metadata, Source("api"))


def test_api_writes_at_the_limits_pass() -> None:
    user_write(Target("dataset", "ds"), {"n": [2**64 - 1, -(2**63), 1e308, "ok"]}, Source("api"))


def test_a_path_that_is_not_utf8_is_one_reject_and_the_rest_is_read(staging: Staging, tmp_path: Path) -> None:
    """A folder named with bytes that are not UTF-8 crashed the read (Redis keys and the store
    need text); now it is one reject, recorded once however often it is scanned."""
    import os

    bad_dir = os.path.join(os.fsencode(tmp_path), b"exec-\xff")
    os.mkdir(bad_dir)
    with open(os.path.join(bad_dir, b"valohai.metadata.jsonl"), "wb") as f:
        f.write(b'{"dataset-version": "dataset://ds/v1", "metadata": {"a": 1}}\n')
    good = _write(tmp_path, [_v({"b": 2})])
    ingestor = Ingestor(tmp_path, staging, line_limit=1024 * 1024)
    bad = tmp_path / os.fsdecode(b"exec-\xff") / "valohai.metadata.jsonl"
    for _ in range(3):
        assert ingestor.ingest(bad).lines == 0
    assert ingestor.ingest(good).lines == 1
    rejects = staging.rejects()
    assert [(r.file, r.line) for r in rejects] == [("exec-\\xff/valohai.metadata.jsonl", 0)]
    assert "not valid UTF-8" in rejects[0].reason
