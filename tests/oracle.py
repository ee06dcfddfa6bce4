"""The oracle of the fault tests: the correct final properties, computed in plain Python.

For any set of sidecar files (and API writes), what the database must hold once every version has
completed and every apply has run is a fold: for each target, its lines in file order (shallow
set, null deletes), the files of one target in the order their lines were first staged (the order
the files are given here), then the API writes in their order. `expected_state` computes that;
`assert_matches_db` compares it with the database key by key and names every difference.

With property definitions (`definitions`: key -> the definition's body as the API takes it), a
change that a `reject` definition of its key refuses is left out of the fold (the rest of its
line applies), and `expected_violations` says what each target must carry (`warn`: the value is
stored and the target names the rule it breaks).

Independent of `worker/` on purpose (it must not share code with what it checks): lines are
parsed with the standard `json` module and judged by the README's rules, re-implemented here;
only the table models are imported, to read the database.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, joinedload

from worker.store.models import Dataset, DatasetVersion, Datum, VersionFile

JSONL_NAMES = ("valohai.metadata.jsonl", "outputs.metadata.jsonl")
_NAME = r"[A-Za-z0-9._-]{1,255}"
_VERSION_URI = re.compile(rf"dataset://({_NAME})/({_NAME})")
_DATASET_URI = re.compile(rf"dataset://({_NAME})")
_MAX_KEY, _MAX_DEPTH, _MAX_PATH, _MAX_PATH_BYTES = 256, 32, 4096, 2048

Files = Mapping[str, Sequence[bytes]] | Iterable[Path]
State = dict[str, dict[str, Any]]


# -- reading files ------------------------------------------------------------------------------


def read_lines(path: Path, *, final: bool = False) -> list[bytes]:
    """A file's lines without their newlines. A last line without its newline is held by the
    sidecar until the execution completes: it counts only when `final` is true."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if final and tail:
        lines.append(tail)
    return lines


def datum_key(execution: str, path: str) -> str:
    """How the oracle names a datum's property set (the database has no URI for datums)."""
    return f"datum:{execution}/{path}"


# -- judging one line ---------------------------------------------------------------------------


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _good_properties(metadata: Any, *, reserved_ok: bool) -> bool:
    if not isinstance(metadata, dict):
        return False
    for key, value in metadata.items():
        if not 1 <= len(key) <= _MAX_KEY or _depth(value) > _MAX_DEPTH:
            return False
        if key.startswith("valohai.") and not reserved_ok:
            return False
    return True


def _version_uri(uri: Any) -> str | None:
    """The URI of a writable version (`latest` is not one), else None."""
    if not isinstance(uri, str):
        return None
    match = _VERSION_URI.fullmatch(uri)
    return uri if match and match.group(2) != "latest" else None


def _datum_reserved_ok(metadata: dict[str, Any]) -> bool:
    """The datum keys the platform defines have the shapes its schema gives them."""
    tags, alias = metadata.get("valohai.tags", []), metadata.get("valohai.alias", "x")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return False
    if not isinstance(alias, str) or not alias:
        return False
    # `valohai.dataset-versions` is judged item by item (`version_items`): a bad item costs only
    # itself, never the datum's properties.
    return isinstance(metadata.get("valohai.model-versions", []), list)


_ALIAS = re.compile(_NAME)


def _good_item(item: Any) -> tuple[str, dict[str, Any]] | None:
    """(version URI, options) of one `valohai.dataset-versions` item, or None if it is refused."""
    if isinstance(item, str):
        return (item, {}) if _version_uri(item) else None
    if not isinstance(item, dict) or _version_uri(item.get("uri")) is None:
        return None
    base = item.get("from")
    if base is not None and not (isinstance(base, str) and _VERSION_URI.fullmatch(base)):
        return None
    exclude = item.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        return None
    if not isinstance(item.get("start_fresh", False), bool):
        return None
    names = item.get("targeting_aliases", [])
    if not isinstance(names, list) or not all(
        isinstance(n, str) and _ALIAS.fullmatch(n) and n != "latest" for n in names
    ):
        return None
    return item["uri"], item


def version_items(metadata: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The good items of a datum's `valohai.dataset-versions`, the first per URI."""
    items = metadata.get("valohai.dataset-versions")
    out: dict[str, dict[str, Any]] = {}
    for item in items if isinstance(items, list) else []:
        good = _good_item(item)
        if good is not None:
            out.setdefault(good[0], good[1])
    return list(out.items())


def _good_datum_path(path: Any) -> bool:
    return (
        isinstance(path, str)
        and 1 <= len(path) <= _MAX_PATH
        and len(path.encode()) <= _MAX_PATH_BYTES
        and not path.startswith("/")
        and ".." not in path.split("/")
        and "\0" not in path
    )


def classify(raw: bytes, execution: str) -> list[tuple[str, dict[str, Any]]]:
    """The (target key, metadata) pairs one line sets; [] for a line the sidecar rejects.

    Covers the rules of the README (JSON object, one of the three shapes, URI names, reserved
    `valohai.` keys, key length, depth). A datum line sets its datum's properties and, for the
    versions it names, makes it a member (membership is not part of the property oracle)."""
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        return []
    if not isinstance(doc, dict) or not _storable(doc):
        return []
    for kind, pattern in (("dataset-version", _VERSION_URI), ("dataset", _DATASET_URI)):
        if kind in doc:
            uri, metadata = doc.get(kind), doc.get("metadata")
            if set(doc) != {kind, "metadata"} or not isinstance(uri, str) or not pattern.fullmatch(uri):
                return []
            if not isinstance(metadata, dict):
                return []
            if kind == "dataset-version" and _version_uri(uri) is None:
                return []
            return [(uri, metadata)] if _good_properties(metadata, reserved_ok=False) else []
    if "file" in doc:
        path, metadata = doc.get("file"), doc.get("metadata")
        if set(doc) != {"file", "metadata"} or not isinstance(path, str) or not _good_datum_path(path):
            return []
        if not isinstance(metadata, dict):
            return []
        if not _good_properties(metadata, reserved_ok=True) or not _datum_reserved_ok(metadata):
            return []
        return [(datum_key(execution, path), metadata)]
    return []


def _storable(value: Any) -> bool:
    """No string (key or value) holds NUL, and no number overflows a double (what the database
    cannot store, and the README says is rejected)."""
    if isinstance(value, dict):
        return all("\0" not in k and _storable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_storable(v) for v in value)
    if isinstance(value, str):
        return "\0" not in value
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# -- property definitions -------------------------------------------------------------------------

Definitions = Mapping[str, Mapping[str, Any]]
_SCOPES = ("dataset", "version", "datum")


def scope_of(target: str) -> str:
    """`dataset`, `version` or `datum`, from an oracle target key."""
    if target.startswith("datum:"):
        return "datum"
    return "version" if target.count("/") == 3 else "dataset"


def _covers(definition: Mapping[str, Any], scope: str) -> bool:
    return scope in definition.get("scopes", _SCOPES)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _of_type(kind: str, value: Any) -> bool:
    if kind == "integer":
        return _is_number(value) and value == math.floor(value)
    if kind == "date":
        return (
            isinstance(value, str)
            and re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ][0-9:.]+(Z|[+-]\d{2}:\d{2})?)?", value) is not None
        )
    python = {"string": str, "boolean": bool, "object": dict, "array": list}
    if kind == "number":
        return _is_number(value)
    return isinstance(value, python[kind])


def _allowed(definition: Mapping[str, Any]) -> list[Any]:
    return [a["value"] if isinstance(a, dict) else a for a in definition.get("allowed_values") or []]


def broken_rule(definition: Mapping[str, Any], value: Any) -> str | None:
    """The rule a (non-null) value breaks: `type` first, then `allowed_values`; None if none."""
    kind = definition.get("type")
    if kind is not None and not _of_type(kind, value):
        return "type"
    allowed = _allowed(definition)
    if allowed and not any(
        (a == value if _is_number(a) and _is_number(value) else same(a, value)) for a in allowed
    ):
        return "allowed_values"
    return None


def _refused(definitions: Definitions | None, target: str, key: str, value: Any) -> bool:
    definition = (definitions or {}).get(key)
    return (
        definition is not None
        and value is not None
        and definition.get("enforcement") == "reject"
        and _covers(definition, scope_of(target))
        and broken_rule(definition, value) is not None
    )


def expected_violations(
    state: State, definitions: Definitions, *, completed: Iterable[str] = ()
) -> dict[str, list[dict[str, Any]]]:
    """Target -> its violations in key order (`{"key", "rule", "value"}`), for every target of
    `state`. `required` counts for datasets and datums, and for versions once `completed`."""
    done = set(completed)
    out: dict[str, list[dict[str, Any]]] = {}
    for target, properties in state.items():
        scope = scope_of(target)
        found = []
        for key in sorted(definitions):
            definition = definitions[key]
            if not _covers(definition, scope):
                continue
            if key in properties:
                rule = broken_rule(definition, properties[key])
                if rule is not None:
                    found.append({"key": key, "rule": rule, "value": properties[key]})
            elif definition.get("required") and (scope != "version" or target in done):
                found.append({"key": key, "rule": "required", "value": None})
        out[target] = found
    return out


# -- the fold -----------------------------------------------------------------------------------


def fold_into(
    state: dict[str, Any], metadata: Mapping[str, Any], refused: Any = lambda _key, _value: False
) -> None:
    """Shallow set, null deletes (its own code: the oracle shares nothing with worker.merge);
    a change `refused(key, value)` is left out."""
    for key, value in metadata.items():
        if refused(key, value):
            continue
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value


def _execution_of(name: str | Path, root: Path | None) -> str:
    path = Path(name)
    if root is not None and path.is_absolute():
        path = path.relative_to(root)
    return path.parts[-2] if len(path.parts) >= 2 else ""


def expected_state(
    files: Files,
    *,
    root: Path | None = None,
    api_writes: Sequence[tuple[str, Mapping[str, Any]]] = (),
    final: bool = False,
    definitions: Definitions | None = None,
) -> State:
    """Target key -> its expected properties, once everything has completed and been applied.

    `files`: either {relative path (`<execution>/valohai.metadata.jsonl`): [line bytes, ...]} or
    paths of files to read (a last line without its newline counts only when `final`). The
    execution of a file is its folder's name. Files are folded in the order given, so files that
    feed one target must be given in the order their lines were first staged (tests keep it
    simple: one file per target, or files whose keys do not collide). `api_writes`:
    (target key, metadata) in the order they were made, applied after every line.
    Keys are `dataset://<name>`, `dataset://<name>/<version>` and `datum:<execution>/<path>`.
    `definitions`: changes their `reject` definitions refuse are left out (lines and API writes).
    """
    if isinstance(files, Mapping):
        named: list[tuple[str, Sequence[bytes]]] = [(str(k), v) for k, v in files.items()]
    else:
        named = [(str(p), read_lines(Path(p), final=final)) for p in files]
    state: State = {}
    for name, lines in named:
        execution = _execution_of(name, root)
        for raw in lines:
            for target, metadata in classify(raw.rstrip(b"\n"), execution):
                fold_into(state.setdefault(target, {}), metadata, _refusing(definitions, target))
    for target, written in api_writes:
        fold_into(state.setdefault(target, {}), written, _refusing(definitions, target))
    return state


def _refusing(definitions: Definitions | None, target: str) -> Any:
    return lambda key, value: _refused(definitions, target, key, value)


# -- membership ---------------------------------------------------------------------------------

Members = dict[str, dict[str, str]]  # version URI -> {file name: the execution that wrote it}


def expected_files(
    files: Files, *, root: Path | None = None, final: bool = False, order: Sequence[str] | None = None
) -> Members:
    """Version URI -> its files once completed, for versions completed one after the other in
    `order` (default: as first named), each after all the lines naming it were staged.

    The README's rules, re-implemented: base = the files of `from` (a version completed before,
    `latest` = the one completed last, or an alias) minus `exclude` (none with `start_fresh`);
    the first `from` of a version wins (a conflicting item's options count for nothing, its file
    still joins); own files in line order replace base files of their name; `targeting_aliases`
    move to the version as it completes, unless a version has that name."""
    if isinstance(files, Mapping):
        named: list[tuple[str, Sequence[bytes]]] = [(str(k), v) for k, v in files.items()]
    else:
        named = [(str(p), read_lines(Path(p), final=final)) for p in files]
    members: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for name, lines in named:
        execution = _execution_of(name, root)
        for raw in lines:
            for target, metadata in classify(raw.rstrip(b"\n"), execution):
                if target.startswith("datum:"):
                    path = target[len(f"datum:{execution}/") :]
                    for uri, options in version_items(metadata):
                        members.setdefault(uri, []).append((execution, path, options))
    done: Members = {}
    aliases: dict[str, str] = {}
    latest: dict[str, str] = {}
    for uri in order if order is not None else list(members):
        done[uri], agreeing = _complete(members.get(uri, []), done, aliases, latest, set(members))
        dataset = uri[len("dataset://") :].split("/")[0]
        for options in agreeing:
            for alias in options.get("targeting_aliases", []):
                if f"dataset://{dataset}/{alias}" not in members:
                    aliases[f"dataset://{dataset}/{alias}"] = uri
        latest[dataset] = uri
    return done


def _complete(
    entries: list[tuple[str, str, dict[str, Any]]],
    done: Members,
    aliases: dict[str, str],
    latest: dict[str, str],
    names: set[str],
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """(a version's files, the options of its items that agree with its first `from`)."""
    base_uri, agreeing = _UNSET, []
    for _, _, options in entries:
        if "from" in options:
            if base_uri is _UNSET:
                base_uri = options["from"]
            elif options["from"] != base_uri:
                continue
        agreeing.append(options)
    files: dict[str, str] = {}
    base = _base(base_uri, done, aliases, latest, names)
    if base is not None and not any(o.get("start_fresh") for o in agreeing):
        excluded = {x for o in agreeing for x in o.get("exclude", [])}
        files = {n: e for n, e in base.items() if n not in excluded}
    for execution, path, _ in entries:
        files[path] = execution
    return files, agreeing


_UNSET: Any = object()


def _base(
    base_uri: Any, done: Members, aliases: dict[str, str], latest: dict[str, str], names: set[str]
) -> dict[str, str] | None:
    if not isinstance(base_uri, str):
        return None
    dataset, version = base_uri[len("dataset://") :].split("/")
    if base_uri in names:  # a version of that name (completed, or not: then no base)
        return done.get(base_uri)
    if version == "latest":
        return done.get(latest.get(dataset, ""))
    return done.get(aliases.get(base_uri, ""))


def db_files(engine: Engine) -> Members:
    """Every version's files as the database holds them (a version without files is absent)."""
    out: Members = {}
    with Session(engine) as session:
        rows = session.execute(
            select(Dataset.name, DatasetVersion.name, Datum.path, Datum.execution)
            .join(DatasetVersion, DatasetVersion.dataset_id == Dataset.id)
            .join(VersionFile, VersionFile.version_id == DatasetVersion.id)
            .join(Datum, Datum.id == VersionFile.datum_id)
        ).all()
    for dataset, version, path, execution in rows:
        files = out.setdefault(f"dataset://{dataset}/{version}", {})
        assert path not in files, f"dataset://{dataset}/{version} holds two files named {path!r}"
        files[path] = execution
    return out


def assert_files_match_db(engine: Engine, expected: Members, *, only: Iterable[str] | None = None) -> None:
    """Fail naming each version whose files differ from the oracle's, file by file."""
    actual = db_files(engine)
    keys = set(only) if only is not None else expected.keys() | actual.keys()
    problems = []
    for uri in sorted(keys):
        want, have = expected.get(uri, {}), actual.get(uri, {})
        if want != have:
            missing = sorted(set(want.items()) - set(have.items()))
            extra = sorted(set(have.items()) - set(want.items()))
            problems.append(f"{uri}: missing {missing}, unexpected {extra}")
    if problems:
        raise AssertionError("the version files differ from the oracle:\n" + "\n".join(problems))


# -- the database -------------------------------------------------------------------------------


def db_violations(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every target's stored violations, keyed as the oracle keys targets."""
    out: dict[str, list[dict[str, Any]]] = {}
    with Session(engine) as session:
        for ds in session.scalars(select(Dataset)):
            out[f"dataset://{ds.name}"] = list(ds.violations or [])
        for v in session.scalars(select(DatasetVersion).options(joinedload(DatasetVersion.dataset))):
            out[f"dataset://{v.dataset.name}/{v.name}"] = list(v.violations or [])
        for d in session.scalars(select(Datum)):
            out[datum_key(d.execution, d.path)] = list(d.violations or [])
    return out


def db_state(engine: Engine) -> tuple[State, dict[str, str]]:
    """(every target's properties, every version's status) as the database holds them."""
    props: State = {}
    status: dict[str, str] = {}
    with Session(engine) as session:
        for ds in session.scalars(select(Dataset)):
            props[f"dataset://{ds.name}"] = dict(ds.properties or {})
        for v in session.scalars(select(DatasetVersion).options(joinedload(DatasetVersion.dataset))):
            key = f"dataset://{v.dataset.name}/{v.name}"
            props[key] = dict(v.properties or {})
            status[key] = v.status
        for d in session.scalars(select(Datum)):
            props[datum_key(d.execution, d.path)] = dict(d.properties or {})
    return props, status


def same(a: Any, b: Any) -> bool:
    """JSON equality where 1, 1.0 and true differ (as they do to a user), at every depth."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


_MISSING: Any = object()


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def _key_diff(target: str, want: dict[str, Any], have: dict[str, Any]) -> list[str]:
    keys = sorted(want.keys() | have.keys())
    bad = [k for k in keys if not same(want.get(k, _MISSING), have.get(k, _MISSING))]
    if not bad:
        return []
    lines = [f"{target}: {len(bad)} of {len(keys)} keys differ"]
    for k in bad:
        w, h = _show(want.get(k, _MISSING)), _show(have.get(k, _MISSING))
        lines.append(f"    {k!r}: expected {w}, database {h}")
    return lines


def diff(
    expected: State,
    actual: State,
    status: Mapping[str, str] | None = None,
    completed: Iterable[str] = (),
) -> list[str]:
    """Readable differences, target by target and key by key; [] when they agree.

    A target the database does not hold counts as an empty set; a target the oracle does not know
    must be empty in the database; every target in `completed` must have status `completed`."""
    out: list[str] = []
    for target in sorted(expected.keys() | actual.keys()):
        want, have = expected.get(target, {}), actual.get(target)
        if have is None:
            if want:
                out.append(f"{target}: missing in the database (expected {len(want)} keys: {_show(want)})")
        elif target not in expected and have:
            out.append(f"{target}: unexpected in the database: {_show(have)}")
        else:
            out += _key_diff(target, want, have)
    for target in sorted(completed):
        got = (status or {}).get(target, "missing")
        if got != "completed":
            out.append(f"{target}: status {got}, expected completed")
    return out


def assert_matches_db(
    engine: Engine,
    expected: State,
    *,
    completed: Iterable[str] = (),
    only: Iterable[str] | None = None,
    definitions: Definitions | None = None,
) -> None:
    """Fail with a key-by-key account of every difference between the database and the oracle.

    The whole database is compared unless `only` names the targets to compare. With
    `definitions`, each target's violations are compared too (a target the oracle does not
    know holds no properties, so only `required` keys can be missing on it)."""
    actual, status = db_state(engine)
    if only is not None:
        keep = set(only)
        expected = {k: v for k, v in expected.items() if k in keep}
        actual = {k: v for k, v in actual.items() if k in keep}
    completed = list(completed)
    problems = diff(expected, actual, status, completed)
    if definitions is not None:
        held = {target: expected.get(target, {}) for target in actual}
        want = expected_violations(held, definitions, completed=completed)
        for target, have in sorted(db_violations(engine).items()):
            if target in actual and not same(want.get(target, []), have):
                problems.append(f"{target}: violations {_show(have)}, expected {_show(want.get(target, []))}")
    if problems:
        agree = sum(1 for t in expected if not any(p.startswith(f"{t}:") for p in problems))
        head = f"the database differs from the oracle ({agree} of {len(expected)} expected targets agree):"
        raise AssertionError("\n".join([head, *problems]))
