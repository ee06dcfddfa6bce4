"""Pure core: one line's bytes become entries or a clear reason."""

from __future__ import annotations

import orjson
import pytest

from tests.helpers import src
from worker.errors import InvalidEntry, ReservedKey
from worker.records import Entry, parse_datum_object, parse_line, user_write
from worker.uris import Target


def test_the_three_line_kinds() -> None:
    (ds,) = parse_line(b'{"dataset": "dataset://press", "metadata": {"machine": "press-04"}}', src())
    assert (
        ds.target == Target("dataset", "press") and ds.op == "set" and ds.metadata == {"machine": "press-04"}
    )
    (ver,) = parse_line(
        b'{"dataset-version": "dataset://press/20240912-101530", "metadata": {"n": 1}}', src()
    )
    assert ver.target == Target("version", "press", "20240912-101530")
    datum = b'{"file": "sub/a.png", "metadata": {"valohai.dataset-versions": ["dataset://press/v1", '
    datum += b'{"uri": "dataset://press/v2", "from": "dataset://press/v1"}, "dataset://press/v1"], "k": 1}}'
    entries = parse_line(datum, src())
    assert [(e.target.key, e.op, e.path) for e in entries] == [
        ("execution:exec-1", "set", "sub/a.png"),
        ("dataset://press/v1", "member", "sub/a.png"),
        ("dataset://press/v2", "member", "sub/a.png"),
    ]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"metadata": {}}', "none of the keys"),
        (b'{"dataset": "dataset://a/b", "metadata": {}}', "without a version"),
        (b'{"dataset": "s3://a", "metadata": {}}', "must start with dataset://"),
        (b'{"dataset-version": "dataset://a", "metadata": {}}', "expected dataset://<name>/<version>"),
        (b'{"dataset-version": "dataset://a/b c", "metadata": {}}', "may only hold"),
        (b'{"dataset-version": "dataset://a//b", "metadata": {}}', "expected dataset://<name> or"),
        (b'{"dataset-version": "dataset://a/latest", "metadata": {}}', "'latest'"),
        (b'{"dataset": "dataset://a", "metadata": [1]}', "is not of type 'object'"),
        (b'{"dataset": "dataset://a"}', "'metadata' is a required property"),
        (b'{"dataset": "dataset://a", "metadata": {"": 1}}', "dataset-line.metadata"),
        (b'{"file": "../etc/passwd", "metadata": {}}', "datum-line.file"),
        (b'{"file": "/abs", "metadata": {}}', "datum-line.file"),
        (b'{"file": "a", "metadata": {"valohai.tags": "x"}}', "valohai.tags"),
        (b'{"file": "a", "metadata": {"valohai.dataset-versions": ["dataset://a"]}}', "dataset-versions"),
    ],
)
def test_bad_lines_say_why(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEntry) as info:
        parse_line(raw, src())
    assert reason in str(info.value)


def test_reserved_keys_refuse_the_whole_line() -> None:
    with pytest.raises(ReservedKey) as info:
        parse_line(b'{"dataset": "dataset://a", "metadata": {"ok": 1, "valohai.last-used": "x"}}', src())
    assert info.value.key == "valohai.last-used"
    # Datum lines keep their reserved keys (tags, alias, dataset-versions, model-versions).
    parse_line(
        b'{"file": "a", "metadata": {"valohai.tags": ["t"], "valohai.model-versions": ["model://m/"]}}', src()
    )


def test_depth_and_key_length_limits() -> None:
    deep = "[" * 33 + "]" * 33
    with pytest.raises(InvalidEntry, match="deeper than 32"):
        parse_line(b'{"dataset": "dataset://a", "metadata": {"k": %s}}' % deep.encode(), src())
    ok = "[" * 32 + "]" * 32
    parse_line(b'{"dataset": "dataset://a", "metadata": {"k": %s}}' % ok.encode(), src())
    with pytest.raises(InvalidEntry, match="key length"):
        user_write(Target("dataset", "a"), {"k" * 257: 1}, src())


@pytest.mark.parametrize("kind", ["dataset", "version", "datum", "per-output"])
@pytest.mark.parametrize("depth", [31, 32, 33])
@pytest.mark.parametrize("extra", [b"", b', "s": "[[{{"'])
def test_the_depth_limit_is_the_same_whatever_the_brackets_around_it(
    kind: str, depth: int, extra: bytes
) -> None:
    """Lines with few brackets skip the depth walk: the limit must hold exactly at the edge,
    for every kind of line, and with brackets inside strings too."""
    value = ('{"a": ' * depth + '"{[x"' + "}" * depth) if depth % 2 else ("[" * depth + "]" * depth)
    metadata = b'{"k": %s%s}' % (value.encode(), extra)
    lines = {
        "dataset": b'{"dataset": "dataset://a", "metadata": %s}' % metadata,
        "version": b'{"dataset-version": "dataset://a/v", "metadata": %s}' % metadata,
        "datum": b'{"file": "f", "metadata": %s}' % metadata,
    }

    def parse() -> list[Entry]:
        if kind == "per-output":
            return parse_datum_object(metadata, "f", src())
        return parse_line(lines[kind], src())

    if depth > 32:
        with pytest.raises(InvalidEntry, match="deeper than 32"):
            parse()
    else:
        assert parse()


def test_per_output_metadata_file() -> None:
    entries = parse_datum_object(
        b'{\n "label": "cat",\n "valohai.dataset-versions": ["dataset://d/v"]\n}', "out/x.jpg", src()
    )
    assert [(e.target.key, e.op, e.path) for e in entries] == [
        ("execution:exec-1", "set", "out/x.jpg"),
        ("dataset://d/v", "member", "out/x.jpg"),
    ]


def test_entry_json_round_trip() -> None:
    (entry,) = parse_line(
        b'{"dataset-version": "dataset://a/v", "metadata": {"x": {"y": [1, null]}}}', src(line=7, offset=99)
    )
    assert Entry.from_json(entry.to_json()) == entry


def test_errors_survive_pickling() -> None:
    import pickle

    for exc in (ReservedKey("valohai.x"), InvalidEntry("bad", "k")):
        again = pickle.loads(pickle.dumps(exc))
        assert str(again) == str(exc) and type(again) is type(exc)


def test_the_schema_checks_the_key_lengths_that_lines_skip_in_code() -> None:
    """Lines leave key lengths to `properties.schema.json`; it must say what MAX_KEY_LENGTH says."""
    import json

    from worker.records import MAX_KEY_LENGTH
    from worker.schemas import schema_dir

    names = json.loads((schema_dir() / "properties.schema.json").read_text())["propertyNames"]
    assert names == {"minLength": 1, "maxLength": MAX_KEY_LENGTH}
    for key in ("", "k" * (MAX_KEY_LENGTH + 1)):
        meta = json.dumps({key: 1}).encode()
        for raw in (
            b'{"dataset": "dataset://a", "metadata": %s}' % meta,
            b'{"dataset-version": "dataset://a/v", "metadata": %s}' % meta,
            b'{"file": "f", "metadata": %s}' % meta,
        ):
            with pytest.raises(InvalidEntry):
                parse_line(raw, src())
    parse_line(b'{"file": "f", "metadata": {"%s": 1}}' % (b"k" * MAX_KEY_LENGTH), src())


def test_member_entries_carry_their_item_options() -> None:
    item = {
        "uri": "dataset://press/v3",
        "from": "dataset://press/production",
        "exclude": ["old.csv"],
        "start_fresh": False,
        "targeting_aliases": ["production", "best.v1"],
        "packaging": True,
        "unknown": 1,
    }
    raw = orjson.dumps(
        {"file": "a.csv", "metadata": {"valohai.dataset-versions": ["dataset://press/v2", item]}}
    )
    _, plain, full = parse_line(raw, src())
    assert plain.metadata == {}  # a plain URI keeps the staged entry small
    assert b'"metadata":{}' in plain.to_json()
    assert full.target == Target("version", "press", "v3")
    assert full.metadata == {
        "from": "dataset://press/production",
        "exclude": ["old.csv"],
        "start_fresh": False,
        "targeting_aliases": ["production", "best.v1"],
        "packaging": True,
    }
    (_, latest) = parse_line(
        b'{"file": "a", "metadata": {"valohai.dataset-versions": [{"uri": "dataset://d/v", "from": null}]}}',
        src(),
    )
    assert latest.metadata == {"from": None}


BAD_ITEMS = [
    (3, "valohai.dataset-versions[1]: expected a version URI or an object with 'uri', got a number"),
    ("dataset://d", "valohai.dataset-versions[1]: bad dataset URI"),
    ("dataset://d/latest", "cannot be written to"),
    ({"from": "dataset://d/v1"}, "valohai.dataset-versions[1]: 'uri' is required"),
    ({"uri": "dataset://d/v2", "from": "s3://x"}, "valohai.dataset-versions[1].from: bad dataset URI"),
    ({"uri": "dataset://d/v2", "from": "dataset://d"}, "valohai.dataset-versions[1].from: expected"),
    ({"uri": "dataset://d/v2", "exclude": "a.csv"}, "valohai.dataset-versions[1].exclude: expected a list"),
    ({"uri": "dataset://d/v2", "exclude": [1]}, "valohai.dataset-versions[1].exclude: expected a list"),
    ({"uri": "dataset://d/v2", "start_fresh": 1}, "valohai.dataset-versions[1].start_fresh"),
    ({"uri": "dataset://d/v2", "targeting_aliases": "prod"}, "targeting_aliases: expected a list"),
    ({"uri": "dataset://d/v2", "targeting_aliases": ["a b"]}, "targeting_aliases: alias 'a b' must be"),
    ({"uri": "dataset://d/v2", "targeting_aliases": ["a/b"]}, "targeting_aliases: alias 'a/b' must be"),
    ({"uri": "dataset://d/v2", "targeting_aliases": [""]}, "targeting_aliases: alias '' must be"),
    ({"uri": "dataset://d/v2", "targeting_aliases": ["x" * 256]}, "must be 1..255"),
    ({"uri": "dataset://d/v2", "targeting_aliases": ["latest"]}, "cannot be an alias"),
]


@pytest.mark.parametrize(("item", "reason"), BAD_ITEMS)
def test_a_bad_version_item_costs_only_itself(item: object, reason: str) -> None:
    metadata = {"label": "cat", "valohai.dataset-versions": ["dataset://d/v1", item, "dataset://d/v3"]}
    raw = orjson.dumps({"file": "a.csv", "metadata": metadata})
    problems: list[str] = []
    entries = parse_line(raw, src(), problems)
    assert [(e.target.key, e.op) for e in entries] == [
        ("execution:exec-1", "set"),
        ("dataset://d/v1", "member"),
        ("dataset://d/v3", "member"),
    ]
    assert entries[0].metadata == metadata  # the datum's properties as written
    assert len(problems) == 1 and reason in problems[0], problems
    # Without a list to collect them, the item rejects the line (the API's and tests' strict form).
    with pytest.raises(InvalidEntry, match="valohai.dataset-versions"):
        parse_line(raw, src())
    per_output: list[str] = []
    assert len(parse_datum_object(orjson.dumps(metadata), "a.csv", src(), per_output)) == 3
    assert per_output == problems


def test_dataset_versions_that_is_not_a_list_keeps_the_datum() -> None:
    problems: list[str] = []
    raw = b'{"file": "a", "metadata": {"k": 1, "valohai.dataset-versions": "dataset://d/v1"}}'
    (entry,) = parse_line(raw, src(), problems)
    assert entry.op == "set" and entry.metadata["k"] == 1
    assert problems == ["valohai.dataset-versions: expected a list, got a string"]
