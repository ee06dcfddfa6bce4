"""Datums' size and checksums from the real files: bounded reads, links out of the root, gone files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from tests.test_datums import complete, datum_line, stage
from worker import checksums
from worker.checksums import check_execution, file_digest
from worker.staging import Staging
from worker.store.models import Datum


def expected(data: bytes) -> dict[str, Any]:
    return {
        "size": len(data),
        "md5": hashlib.md5(data).hexdigest(),
        "sha1": hashlib.sha1(data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def test_a_big_file_is_read_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * checksums.CHUNK + 12345)
    (tmp_path / "big.bin").write_bytes(data)
    reads: list[int] = []
    real_read = checksums._read

    class Spy:
        def __init__(self, f: Any) -> None:
            self.f = f

        def readinto(self, buffer: bytearray) -> int:
            n = int(self.f.readinto(buffer))
            reads.append(len(buffer))
            return n

    monkeypatch.setattr(checksums, "_read", lambda f: real_read(Spy(f)))
    digest = file_digest(tmp_path.resolve(), tmp_path / "big.bin")
    assert digest is not None and digest.__dict__ == expected(data)
    assert reads and max(reads) == checksums.CHUNK and len(reads) == 5  # 4 reads and the empty end


def test_refused_paths(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "e").mkdir(parents=True)
    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"secret")
    (root / "e" / "inside.txt").write_bytes(b"inside")
    (root / "e" / "out.txt").symlink_to(outside)
    (root / "e" / "in-link.txt").symlink_to(root / "e" / "inside.txt")
    os.mkfifo(root / "e" / "fifo")
    (root / "e" / "dir").mkdir()
    real = root.resolve()
    assert file_digest(real, root / "e" / "out.txt") is None
    assert file_digest(real, root / "e" / ".." / ".." / "secret.txt") is None
    assert file_digest(real, root / "e" / "fifo") is None  # and does not block
    assert file_digest(real, root / "e" / "dir") is None
    assert file_digest(real, root / "e" / "gone.txt") is None
    in_link = file_digest(real, root / "e" / "in-link.txt")
    assert in_link is not None and in_link.sha256 == hashlib.sha256(b"inside").hexdigest()


@pytest.mark.redis
def test_check_execution_records_and_nulls(engine: Engine, staging: Staging, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "exec-1" / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(100_000), "sub/b.txt": b"hello\n", "gone.txt": b"x"}
    for name, data in files.items():
        (root / "exec-1" / name).write_bytes(data)
    (tmp_path / "outside.txt").write_bytes(b"outside")
    (root / "exec-1" / "link.txt").symlink_to(tmp_path / "outside.txt")
    # (A `..` path is refused by the line schema already; file_digest refuses it too, above.)
    stage(staging, "exec-1", [datum_line(p, {"n": 1}) for p in [*files, "link.txt"]])
    complete(engine, staging, "exec-1")
    (root / "exec-1" / "gone.txt").unlink()
    stats = check_execution(engine, root, "exec-1")
    assert (stats.checked, stats.missing) == (4, 2)
    with Session(engine) as session:
        rows = {d.path: d for d in session.scalars(select(Datum))}
    for name in ("a.bin", "sub/b.txt"):
        row = rows[name]
        got = {"size": row.size, "md5": row.md5, "sha1": row.sha1, "sha256": row.sha256}
        assert got == expected(files[name]) and row.checked_at is not None
    for name in ("gone.txt", "link.txt"):
        row = rows[name]
        assert (row.size, row.md5, row.sha1, row.sha256) == (None, None, None, None)
        assert row.checked_at is not None
    # Checked once: a second pass reads nothing.
    assert check_execution(engine, root, "exec-1").checked == 0
