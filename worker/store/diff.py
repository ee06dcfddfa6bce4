"""What changed between two dataset versions: their properties, and their files by checksum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import NotFound
from ..merge import same_json
from .models import DatasetVersion, Datum, VersionFile
from .queries import Ref, find_by_uri, get_version

MAX_LISTED = 10_000  # per list of added, removed or changed files (the counts are exact)


@dataclass(frozen=True)
class _File:
    datum: int
    uid: str
    size: int | None
    md5: str | None
    sha256: str | None

    def summary(self) -> dict[str, Any]:
        return {"datum": self.uid, "size": self.size, "md5": self.md5, "sha256": self.sha256}


def default_base(session: Session, version: DatasetVersion) -> DatasetVersion | None:
    """What a version is compared with unless told: the version its `from` named, else the
    dataset's version created just before it."""
    if version.previous_version_id is not None:
        return session.get(DatasetVersion, version.previous_version_id)
    query = (
        select(DatasetVersion)
        .where(DatasetVersion.dataset_id == version.dataset_id, DatasetVersion.id < version.id)
        .order_by(DatasetVersion.id.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def against(session: Session, text: str) -> DatasetVersion:
    """The version `text` names: an id in any form, or a version URI (aliases and `latest` too)."""
    if text.startswith("dataset://"):
        kind, row_id = find_by_uri(session, text)
        if kind != "version":
            raise NotFound(f"{text[:200]} names a dataset, not a version")
        return get_version(session, row_id)
    return get_version(session, text)


def diff(session: Session, ref: Ref, base_text: str | None = None) -> dict[str, Any]:
    """The changes from the base version (`base_text`, else `default_base`) to version `ref`."""
    version = get_version(session, ref)
    base = against(session, base_text) if base_text else default_base(session, version)
    new_props = version.properties or {}
    old_props = (base.properties or {}) if base is not None else {}
    properties = {
        "added": {k: v for k, v in new_props.items() if k not in old_props},
        "removed": {k: v for k, v in old_props.items() if k not in new_props},
        "changed": {
            k: {"old": old_props[k], "new": v}
            for k, v in new_props.items()
            if k in old_props and not same_json(old_props[k], v)
        },
    }
    new_files = _files(session, version.id)
    old_files = _files(session, base.id) if base is not None else {}
    added = sorted(n for n in new_files if n not in old_files)
    removed = sorted(n for n in old_files if n not in new_files)
    changed = sorted(n for n in new_files if n in old_files and not _same(old_files[n], new_files[n]))
    return {
        "version": _ref(version),
        "against": None if base is None else _ref(base),
        "properties": properties,
        "files": {
            "added": [{"name": n, **new_files[n].summary()} for n in added[:MAX_LISTED]],
            "removed": [{"name": n, **old_files[n].summary()} for n in removed[:MAX_LISTED]],
            "changed": [
                {"name": n, "old": old_files[n].summary(), "new": new_files[n].summary()}
                for n in changed[:MAX_LISTED]
            ],
            "counts": {"added": len(added), "removed": len(removed), "changed": len(changed)},
            "unchanged": len(new_files) - len(added) - len(changed),
        },
    }


def _same(old: _File, new: _File) -> bool:
    """One datum is the same file; two datums are the same content when their strongest known
    checksum agrees (sha256, else md5), and different when their sizes or checksums differ. Two
    datums whose content was never read (no checksums) are reported as changed: nothing shows
    they are equal."""
    if old.datum == new.datum:
        return True
    if old.size is not None and new.size is not None and old.size != new.size:
        return False
    for a, b in ((old.sha256, new.sha256), (old.md5, new.md5)):
        if a and b:
            return a == b
    return False


def _files(session: Session, version_id: int) -> dict[str, _File]:
    rows = session.execute(
        select(Datum.path, Datum.id, Datum.uid, Datum.size, Datum.md5, Datum.sha256)
        .join(VersionFile, VersionFile.datum_id == Datum.id)
        .where(VersionFile.version_id == version_id)
    ).all()
    return {path: _File(datum, uid, size, md5, sha256) for path, datum, uid, size, md5, sha256 in rows}


def _ref(row: DatasetVersion) -> dict[str, Any]:
    return {"id": row.uid, "name": row.name, "uri": row.uri}
