"""Pure core: the reserved keys of a datum's metadata that the sidecar acts on.

`valohai.alias` points a `datum://<alias>` at the datum when its execution completes;
`valohai.tags` is the datum's list of tags. The schema (`schemas/datum-metadata.schema.json`)
already refuses an alias that is not a string and tags that are not strings; this module holds
the name rule, which must not cost the rest of the line: a bad alias is dropped from the entry
and reported, the other keys apply.
"""

from __future__ import annotations

import re
from typing import Any

from .limits import NAME_MAX
from .records import Entry

ALIAS_KEY = "valohai.alias"
TAGS_KEY = "valohai.tags"
ALIAS_SCHEME = "datum://"
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def alias_problem(name: Any) -> str | None:
    """Why `name` cannot be a datum alias (None: it can). The rule of dataset names."""
    if not isinstance(name, str) or not name:
        return f"{ALIAS_KEY} must be a non-empty string"
    if len(name) > NAME_MAX:
        return f"{ALIAS_KEY} is {len(name)} characters long, over the limit of {NAME_MAX}"
    if not _NAME.fullmatch(name):
        return f"{ALIAS_KEY} {name[:80]!r} may only hold letters, digits, '-', '_' and '.'"
    return None


def drop_bad_aliases(entries: list[Entry]) -> str | None:
    """Take a malformed `valohai.alias` out of the datum `set` entries of one line, in place.

    Answers the reason (for a reject naming the field) or None. A null alias (a deletion) is
    kept: it removes the key from the datum's properties and moves no alias.
    """
    reason = None
    for entry in entries:
        if entry.op != "set" or entry.target.kind != "execution" or ALIAS_KEY not in entry.metadata:
            continue
        value = entry.metadata[ALIAS_KEY]
        problem = None if value is None else alias_problem(value)
        if problem:
            entry.metadata = {k: v for k, v in entry.metadata.items() if k != ALIAS_KEY}
            reason = problem
    return reason


def alias_name(uri: str) -> str | None:
    """The alias of a `datum://<alias>` URI (None: not such a URI)."""
    if not uri.startswith(ALIAS_SCHEME):
        return None
    return uri[len(ALIAS_SCHEME) :]
