"""Dataset URIs (`dataset://<name>` and `dataset://<name>/<version>`) and staging targets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Literal

from .errors import BadURI
from .limits import NAME_MAX

SCHEME = "dataset://"
LATEST = "latest"
PART = re.compile(r"[A-Za-z0-9._-]+")  # one name in a URI (and a version alias)

TargetKind = Literal["dataset", "version", "execution"]


@dataclass(frozen=True, order=True)
class Target:
    """Something properties are staged for: a dataset, a dataset version, or an execution's datums.

    `key` is the one text form used in Redis keys, Celery arguments and the watermark table.
    """

    kind: TargetKind
    dataset: str = ""
    version: str = ""
    execution: str = ""

    @cached_property  # computed once: ingest asks each entry's target for it a few times
    def key(self) -> str:
        if self.kind == "execution":
            return f"execution:{self.execution}"
        if self.kind == "dataset":
            return f"{SCHEME}{self.dataset}"
        return f"{SCHEME}{self.dataset}/{self.version}"

    @property
    def dataset_target(self) -> Target:
        """The dataset a version belongs to."""
        return Target("dataset", self.dataset)

    @classmethod
    def parse(cls, key: str) -> Target:
        """Inverse of `key`."""
        if key.startswith("execution:"):
            return cls("execution", execution=key[len("execution:") :])
        name, version = parse_uri(key)
        if version is None:
            return cls("dataset", name)
        return cls("version", name, version)

    @classmethod
    def for_execution(cls, execution: str) -> Target:
        return _execution_target(execution)


def parse_uri(uri: str, *, allow_latest: bool = False) -> tuple[str, str | None]:
    """Split a dataset URI into (name, version or None); raise BadURI saying what is wrong."""
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        raise BadURI(str(uri), f"must start with {SCHEME}")
    parts = uri[len(SCHEME) :].split("/")
    if len(parts) > 2:
        raise BadURI(uri, "expected dataset://<name> or dataset://<name>/<version>")
    for part in parts:
        if not part:
            raise BadURI(uri, "empty name part")
        if len(part) > NAME_MAX:
            raise BadURI(uri, f"a name is {len(part)} characters long, over the limit of {NAME_MAX}")
        if not PART.fullmatch(part):
            raise BadURI(uri, f"{part!r} may only hold letters, digits, '-', '_' and '.'")
    if len(parts) == 1:
        return parts[0], None
    if parts[1] == LATEST and not allow_latest:
        raise BadURI(uri, "'latest' means the newest version and cannot be written to")
    return parts[0], parts[1]


def version_target(uri: str) -> Target:
    """The target of a `dataset://<name>/<version>` URI; BadURI if it names no version."""
    name, version = parse_uri(uri)
    if version is None:
        raise BadURI(uri, "expected dataset://<name>/<version>")
    return Target("version", name, version)


def dataset_target(uri: str) -> Target:
    """The target of a `dataset://<name>` URI; BadURI if it names a version."""
    name, version = parse_uri(uri)
    if version is not None:
        raise BadURI(uri, "expected dataset://<name> without a version")
    return Target("dataset", name)


@lru_cache(maxsize=4096)
def _execution_target(execution: str) -> Target:
    # Every datum line of a file names the same execution.
    return Target("execution", execution=execution)
