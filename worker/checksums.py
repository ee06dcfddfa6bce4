"""Size and checksums (md5, sha1, sha256) of an execution's datums, read from the files on disk.

Run by the `sidecar.checksums` task after an execution target's apply, outside the apply
transaction: hashing a large file under SQLite's write lock would stall every other apply. Each
file is read once, in 1 MiB chunks that feed all three hashes, so memory stays bounded whatever
its size. A datum is `<root>/<execution>/<path>`; it is read only if its real path (every
symbolic link resolved) is under the real root and it is a regular file. A file that is gone,
leaves the root or is no regular file gets null checksums (and its `checked_at`, so it is not
tried again at every apply).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, select, update

from .store.db import writer
from .store.models import Datum

log = logging.getLogger(__name__)

CHUNK = 1 << 20
BATCH = 100  # datums hashed, then written in one short transaction


@dataclass(frozen=True)
class Digest:
    """What was read of one file."""

    size: int
    md5: str
    sha1: str
    sha256: str


@dataclass
class CheckStats:
    """What one pass over an execution's datums did."""

    checked: int = 0
    missing: int = 0  # gone, outside the root, or not a regular file: null checksums


def file_digest(root_real: Path, path: Path) -> Digest | None:
    """The size and checksums of `path`, or None if it is gone, resolves outside `root_real`
    (which must be a real path itself) or is not a regular file."""
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return None
    if not real.is_relative_to(root_real):
        return None
    try:
        # O_NOFOLLOW: a link swapped in after realpath is refused, not followed; O_NONBLOCK: a
        # FIFO does not block the open (it is then refused as not regular).
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (OSError, ValueError):
        return None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        return None
    with os.fdopen(fd, "rb", buffering=0) as f:
        return _read(f)


def _read(f: Any) -> Digest:
    md5 = hashlib.md5(usedforsecurity=False)
    sha1 = hashlib.sha1(usedforsecurity=False)
    sha256 = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    size = 0
    while True:
        n = f.readinto(buffer)
        if not n:
            break
        chunk = view[:n]
        md5.update(chunk)
        sha1.update(chunk)
        sha256.update(chunk)
        size += n
    return Digest(size, md5.hexdigest(), sha1.hexdigest(), sha256.hexdigest())


_DATUMS = cast(Table, Datum.__table__)
_SAVE = (
    update(_DATUMS)
    .where(_DATUMS.c.id == bindparam("datum_id"))
    .values(
        size=bindparam("b_size"),
        md5=bindparam("b_md5"),
        sha1=bindparam("b_sha1"),
        sha256=bindparam("b_sha256"),
        checked_at=bindparam("b_checked_at"),
    )
)


def check_execution(engine: Engine, root: Path, execution: str) -> CheckStats:
    """Read and record the checksums of every datum of `execution` not checked yet."""
    stats = CheckStats()
    root_real = Path(os.path.realpath(root))
    with engine.connect() as conn:
        rows = conn.execute(
            select(_DATUMS.c.id, _DATUMS.c.path)
            .where(_DATUMS.c.execution == execution, _DATUMS.c.checked_at.is_(None))
            .order_by(_DATUMS.c.id)
        ).all()
    for start in range(0, len(rows), BATCH):
        values = []
        for datum_id, path in rows[start : start + BATCH]:
            digest = file_digest(root_real, root_real / execution / path)
            stats.checked += 1
            stats.missing += digest is None
            values.append(_values(datum_id, digest))
        # Hashed first, then written in one short transaction (the write lock is held briefly).
        with writer(engine).begin() as conn:
            conn.execute(_SAVE, values)
    return stats


def _values(datum_id: int, digest: Digest | None) -> dict[str, Any]:
    values: dict[str, Any] = {"datum_id": datum_id, "b_checked_at": datetime.now(UTC)}
    for name in ("size", "md5", "sha1", "sha256"):
        values[f"b_{name}"] = None if digest is None else getattr(digest, name)
    return values
