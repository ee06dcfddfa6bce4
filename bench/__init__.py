"""Benchmarks of the dataset-properties sidecar against real Redis and PostgreSQL; see bench/README.md."""
