"""The staging area's Lua scripts, one `.lua` file each under `lua/`, read once per process.

Each file starts with a header naming every KEYS and ARGV slot it uses: a script must name every
key it touches (Redis checks nothing), so the header is where a reader checks a change.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files


@cache
def source(name: str) -> str:
    """The text of `lua/<name>.lua`."""
    return (files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")
