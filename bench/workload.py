"""Synthetic but realistic `valohai.metadata.jsonl` content, deterministic for a seed.

Sizes follow what real executions write: a datum line names an output file, carries a handful of
annotation properties and the versions it joins (~300 bytes); a version line carries ~10 summary
properties (~300 bytes); a dataset line a few descriptive ones (~200 bytes). The mix of the ingest
benchmark is 70% datum, 20% version and 10% dataset lines.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

JSONL = "valohai.metadata.jsonl"
CAMERAS = ("top", "side", "front", "rear")
LABELS = ("ok", "scratch", "dent", "crack", "stain")
SHIFTS = ("night", "day", "evening")
SPLITS = ("train", "val", "test")
ANNOTATORS = tuple(f"annotator-{i:02d}@example.com" for i in range(50))


def dumps(document: dict[str, Any]) -> bytes:
    """One JSON line, newline included."""
    return orjson.dumps(document) + b"\n"


def datum_line(rng: random.Random, index: int, versions: list[str]) -> bytes:
    """A datum line: an output file, its annotation properties, the versions it joins."""
    return dumps(
        {
            "file": f"images/{SPLITS[index % 3]}/{index:08d}.png",
            "metadata": {
                "camera": rng.choice(CAMERAS),
                "label": rng.choice(LABELS),
                "exposure_ms": round(rng.uniform(1, 40), 3),
                "width": 1920,
                "height": 1080,
                "annotator": rng.choice(ANNOTATORS),
                "confidence": round(rng.random(), 4),
                "valohai.dataset-versions": versions,
            },
        }
    )


def version_properties(rng: random.Random, count: int, offset: int = 0) -> dict[str, Any]:
    """`count` summary properties (names `p<offset>`..), numbers, strings and booleans mixed."""
    out: dict[str, Any] = {}
    for i in range(offset, offset + count):
        kind = i % 4
        if kind == 0:
            out[f"p{i}"] = rng.randint(0, 1_000_000)
        elif kind == 1:
            out[f"p{i}"] = round(rng.random(), 6)
        elif kind == 2:
            out[f"p{i}"] = f"value-{rng.randint(0, 9999)}"
        else:
            out[f"p{i}"] = rng.random() < 0.5
    return out


def version_line(uri: str, metadata: dict[str, Any]) -> bytes:
    return dumps({"dataset-version": uri, "metadata": metadata})


def summary_version_line(rng: random.Random, uri: str) -> bytes:
    """A version line with ~10 summary properties, as a training or preprocessing step writes."""
    return version_line(
        uri,
        {
            "sample_count": rng.randint(100, 100_000),
            "defect_rate": round(rng.random() / 10, 5),
            "shift": rng.choice(SHIFTS),
            "preprocessing_version": f"3.{rng.randint(0, 9)}",
            "capture_date": f"2026-01-{rng.randint(1, 28):02d}",
            "machine": f"press-{rng.randint(1, 12):02d}",
            "reviewed": rng.random() < 0.5,
            "mean_exposure_ms": round(rng.uniform(1, 40), 3),
            "source_bucket": "s3://factory-captures/press-line/raw",
            "notes": "captured during the regular production run",
        },
    )


def dataset_line(rng: random.Random, uri: str) -> bytes:
    return dumps(
        {
            "dataset": uri,
            "metadata": {
                "domain": "manufacturing",
                "owner": rng.choice(ANNOTATORS),
                "material": "stainless-steel-304",
                "retention_days": rng.choice((30, 90, 365)),
                "description": "Press line surface inspection images",
            },
        }
    )


def mixed_lines(count: int, seed: int, tag: str = "bench") -> Iterator[bytes]:
    """`count` lines: 70% datum, 20% version, 10% dataset, over a few datasets and versions."""
    rng = random.Random(seed)
    datasets = [f"dataset://{tag}-ds{d}" for d in range(4)]
    versions = [f"{ds}/v{v}" for ds in datasets for v in range(4)]
    for i in range(count):
        roll = i % 10
        if roll < 7:
            yield datum_line(rng, i, [versions[i % len(versions)]])
        elif roll < 9:
            yield summary_version_line(rng, versions[i % len(versions)])
        else:
            yield dataset_line(rng, datasets[i % len(datasets)])


def write_lines(path: Path, lines: Iterator[bytes] | list[bytes], *, append: bool = False) -> int:
    """Write lines to `path` (folders created), in 1 MiB writes; returns the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    buffer: list[bytes] = []
    size = 0
    with open(path, "ab" if append else "wb") as f:
        for line in lines:
            buffer.append(line)
            size += len(line)
            if size >= 1 << 20:
                written += f.write(b"".join(buffer))
                buffer, size = [], 0
        written += f.write(b"".join(buffer))
    return written


def version_lines(uri: str, properties: int, per_line: int, seed: int) -> list[bytes]:
    """Version lines that together set `properties` distinct keys, `per_line` keys per line."""
    rng = random.Random(seed)
    return [
        version_line(uri, version_properties(rng, min(per_line, properties - start), start))
        for start in range(0, properties, per_line)
    ]


def interleaved_lines(rng: random.Random, dataset: str, versions: int, lines: int) -> list[bytes]:
    """Pipeline rows (a)/(b): line j of every version v000.., then line j + 1, 3 keys each."""
    uris = [f"dataset://{dataset}/v{i:03d}" for i in range(versions)]
    return [version_line(uri, version_properties(rng, 3, 3 * j)) for j in range(lines) for uri in uris]


def versions_with_datums(rng: random.Random, dataset: str, versions: int) -> list[bytes]:
    """Pipeline rows (c)/(d): per version v000000.., a line of 10 properties and a datum line
    naming it."""
    out: list[bytes] = []
    for i in range(versions):
        uri = f"dataset://{dataset}/v{i:06d}"
        out.append(version_line(uri, version_properties(rng, 10)))
        out.append(
            dumps({"file": f"out/{i:06d}.bin", "metadata": {"idx": i, "valohai.dataset-versions": [uri]}})
        )
    return out
