"""Pure core of version membership: what a version's files are when it completes.

The datums naming a version (their `member` entries, in stream order) say how it is built: `from`
(a base version whose files carry over), `exclude` (base file names that do not), `start_fresh`
(no base files), `targeting_aliases` (aliases moved to it), `packaging` (kept, no effect). No
database here: `store/apply.py` reads the base's files and writes the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .records import Entry

_UNSET: Any = object()


@dataclass
class Spec:
    """A version's membership options, folded from its member entries (first `from` wins)."""

    base: str | None = None  # the `from` URI (None: no base)
    base_entry: Entry | None = None  # the entry that named it
    start_fresh: bool = False
    exclude: dict[str, None] = field(default_factory=dict)  # ordered set of file names
    aliases: dict[str, Entry] = field(default_factory=dict)  # alias -> the first entry naming it
    packaging: Any = _UNSET

    def to_json(self, builders: Iterable[str], previous: str | None) -> dict[str, Any]:
        """What `dataset_versions.spec` keeps: the options acted on, and the builders."""
        out: dict[str, Any] = {"from": self.base, "resolved_from": previous}
        if self.exclude:
            out["exclude"] = list(self.exclude)
        if self.start_fresh:
            out["start_fresh"] = True
        if self.aliases:
            out["targeting_aliases"] = list(self.aliases)
        if self.packaging is not _UNSET:
            out["packaging"] = self.packaging
        out["builders"] = sorted(set(builders))
        return out


def fold_spec(entries: Iterable[Entry]) -> tuple[Spec, list[tuple[Entry, str]]]:
    """The spec of a version from its member entries in order, and the entries whose `from`
    conflicts with the first one named (with the reason): those entries' options are ignored
    (their datum still joins the version)."""
    spec = Spec()
    named = False
    conflicts: list[tuple[Entry, str]] = []
    for entry in entries:
        options = entry.metadata
        if "from" in options:
            if not named:
                named, spec.base, spec.base_entry = True, options["from"], entry
            elif options["from"] != spec.base:
                reason = (
                    f"from {options['from']!r} conflicts with {spec.base!r}, named first for "
                    f"{entry.target.key}; this item's options are ignored"
                )
                conflicts.append((entry, reason))
                continue
        add_options(spec, entry)
    return spec, conflicts


def add_options(spec: Spec, entry: Entry) -> None:
    """Fold the options of one entry that agrees with `spec` (no conflicting `from`)."""
    options = entry.metadata
    spec.start_fresh = spec.start_fresh or options.get("start_fresh") is True
    spec.exclude.update(dict.fromkeys(options.get("exclude", ())))
    for alias in options.get("targeting_aliases", ()):
        spec.aliases.setdefault(alias, entry)
    if spec.packaging is _UNSET and "packaging" in options:
        spec.packaging = options["packaging"]


def file_list(base: Mapping[str, int] | None, spec: Spec, own: Iterable[tuple[str, int]]) -> dict[str, int]:
    """File name -> datum id of the completed version: the base's files minus the excluded names
    (none with `start_fresh` or no base), then every own file; an own file replaces a base file of
    its name, and of two own files of one name the later wins (a version never holds two)."""
    files: dict[str, int] = {}
    if base is not None and not spec.start_fresh:
        files.update((name, datum) for name, datum in base.items() if name not in spec.exclude)
    for name, datum in own:
        files[name] = datum
    return files
