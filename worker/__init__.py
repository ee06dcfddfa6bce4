"""Dataset-properties sidecar: tail valohai.metadata.jsonl, stage in Redis, apply on completion."""

__version__ = "0.1.0"
