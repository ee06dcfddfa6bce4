"""Dataset-properties sidecar: tail valohai.metadata.jsonl, stage in Redis, apply on completion."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One version string: pyproject.toml's, as the installed package's metadata holds it.
    __version__ = version("dataset-properties-sidecar")
except PackageNotFoundError:  # pragma: no cover - run from a tree that was never installed
    __version__ = "0+unknown"
