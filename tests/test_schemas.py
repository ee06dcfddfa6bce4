"""The compiled validator (the fast yes/no) and the reference `jsonschema` agree on every document.

`worker.schemas.first_error` lets `jsonschema-rs` decide and asks the reference only for the words of
a reject, so the two must never disagree about validity. Hypothesis builds documents near the edges
of the three line schemas (URIs with a trailing newline or a slash too many, `..` segments, NUL
bytes, keys of 0, 256 and 257 characters counted in code points, wrong types, extra keys) and
arbitrary JSON; both validators judge each one.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker import schemas

LINE_SCHEMAS = ("dataset-line", "dataset-version-line", "datum-line")

names = st.sampled_from(["press", "a", "cam.v2", "x-y_z", "", "bad name", "ä", "a/b", "a\n"])
uris = st.builds(
    lambda scheme, name, version, tail: f"{scheme}{name}{version}{tail}",
    st.sampled_from(["dataset://", "dataset:/", "s3://", ""]),
    names,
    st.sampled_from(["", "/v1", "/2024-09-12.1", "/", "/v1/extra", "/ä"]),
    st.sampled_from(["", "", "", "\n", "\n\n", " ", "\x00"]),
)
segments = st.sampled_from(["a", "b.png", "..", ".", "", "..\n", "x\n", "\x00", "...", "ä😀"])
paths = st.builds(
    lambda lead, parts: lead + "/".join(parts),
    st.sampled_from(["", "", "/"]),
    st.lists(segments, min_size=1, max_size=4),
)
keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "k" * 256, "k" * 257, "😀" * 256, "😀" * 257, "valohai.tags", "valohai.alias"]),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
version_items = st.one_of(
    uris,
    json_values,
    st.fixed_dictionaries(
        {"uri": uris},
        optional={
            "from": uris,
            "exclude": st.lists(st.text(max_size=5) | st.integers(), max_size=2),
            "start_fresh": st.booleans() | st.integers(0, 1),
            "targeting_aliases": st.lists(st.text(max_size=5), max_size=2),
            "packaging": st.booleans(),
        },
    ),
)
reserved = st.fixed_dictionaries(
    {},
    optional={
        "valohai.dataset-versions": st.lists(version_items, max_size=3) | json_values,
        "valohai.tags": st.lists(st.text(max_size=5) | st.integers(), max_size=3) | json_values,
        "valohai.alias": st.sampled_from(["", "best", 3]),
        "valohai.model-versions": st.lists(json_values, max_size=2) | json_values,
    },
)
metadata = st.one_of(
    st.builds(lambda free, res: {**free, **res}, st.dictionaries(keys, json_values, max_size=4), reserved),
    json_values,
)
documents = st.one_of(
    st.fixed_dictionaries({"dataset": uris, "metadata": metadata}),
    st.fixed_dictionaries({"dataset-version": uris, "metadata": metadata}),
    st.fixed_dictionaries({"file": paths | json_values, "metadata": metadata}),
    st.fixed_dictionaries(
        {},
        optional={
            "file": paths,
            "dataset": uris,
            "dataset-version": uris,
            "metadata": metadata,
            "extra": json_values,
        },
    ),
    json_values,
)


def verdicts(name: str, document: Any) -> tuple[bool, bool]:
    return schemas.fast_validator(name).is_valid(document), schemas.validator(name).is_valid(document)


@settings(max_examples=1500, deadline=None)
@given(documents)
def test_fast_and_reference_validators_agree(document: Any) -> None:
    for name in LINE_SCHEMAS:
        fast, reference = verdicts(name, document)
        assert fast == reference, (name, document)
        assert (schemas.first_error(name, document) is None) == reference, (name, document)


GOOD = [
    ("dataset-line", {"dataset": "dataset://press", "metadata": {"machine": "press-04", "n": None}}),
    ("dataset-version-line", {"dataset-version": "dataset://press/v1", "metadata": {"k" * 256: [1, {}]}}),
    (
        "datum-line",
        {
            "file": "sub/a..b/..c.png",
            "metadata": {
                "valohai.dataset-versions": [
                    "dataset://press/v1",
                    {"uri": "dataset://p/v2", "packaging": True},
                ],
                "valohai.tags": ["a"],
                "😀" * 256: 1,
            },
        },
    ),
]
# `valohai.dataset-versions` items are checked in worker/records.py (a bad item costs only itself).
BAD = [
    ("dataset-line", {"dataset": "dataset://press\n", "metadata": {}}),
    ("dataset-line", {"dataset": "dataset://press", "metadata": {}, "extra": 1}),
    ("dataset-version-line", {"dataset-version": "dataset://press/v1\n", "metadata": {}}),
    ("dataset-version-line", {"dataset-version": "dataset://press/v1", "metadata": {"": 1}}),
    ("datum-line", {"file": "a/../b", "metadata": {}}),
    ("datum-line", {"file": "/etc/passwd", "metadata": {}}),
    ("datum-line", {"file": "a/..", "metadata": {}}),
    ("datum-line", {"file": "a\x00b", "metadata": {}}),
    ("datum-line", {"file": "a", "metadata": {"😀" * 257: 1}}),
    ("datum-line", {"file": "a", "metadata": {"valohai.tags": [1]}}),
]


@pytest.mark.parametrize(("name", "document"), GOOD)
def test_good_documents_pass_both(name: str, document: Any) -> None:
    assert verdicts(name, document) == (True, True)
    assert schemas.first_error(name, document) is None


@pytest.mark.parametrize(("name", "document"), BAD)
def test_bad_documents_fail_both_and_the_reject_says_where(name: str, document: Any) -> None:
    assert verdicts(name, document) == (False, False)
    error = schemas.first_error(name, document)
    assert error is not None and error.startswith(name)


def test_a_value_the_compiled_validator_cannot_take_goes_to_the_reference() -> None:
    document = {"file": "a", "metadata": {"huge": 10**40, "valohai.tags": [10**40]}}
    assert schemas.first_error("datum-line", document) is not None
    assert schemas.first_error("datum-line", {"file": "a", "metadata": {"huge": 10**40}}) is None
