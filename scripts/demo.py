"""Write a demo execution folder the way the reference example does, and say what to try next."""

from __future__ import annotations

import json
import sys
from pathlib import Path

DATASET = {
    "dataset://press-line": {
        "domain": "manufacturing",
        "machine": "press-04",
        "material": "stainless-steel-304",
        "project_owner": "alice@example.com",
    }
}
VERSION = {
    "dataset://press-line/2026-01-15": {
        "capture_date": "2026-01-15",
        "sample_count": 4700,
        "preprocessing_version": "3.2",
        "shift": "night",
        "defect_rate": 0.002,
    }
}


def main(root: Path) -> None:
    outputs = root / "exec-demo-1"
    outputs.mkdir(parents=True, exist_ok=True)
    # Exactly as the reference example writes it: mode "w", one JSON object per line.
    with open(outputs / "valohai.metadata.jsonl", "w") as outfile:
        for name, metadata in DATASET.items():
            json.dump({"dataset": name, "metadata": metadata}, outfile)
            outfile.write("\n")
        for name, metadata in VERSION.items():
            json.dump({"dataset-version": name, "metadata": metadata}, outfile)
            outfile.write("\n")
        json.dump(
            {
                "file": "images/0001.png",
                "metadata": {"camera": "top", "valohai.dataset-versions": list(VERSION)},
            },
            outfile,
        )
        outfile.write("\n")
    print(
        f"""
Demo execution written to {outputs}/valohai.metadata.jsonl.
Starting `sidecar up` now. Nothing is visible until the version completes. In another terminal:

  .venv/bin/sidecar complete dataset://press-line/2026-01-15
  curl -s 'http://127.0.0.1:8000/api/v0/dataset-versions/?dataset=press-line' | python3 -m json.tool
  echo '{{"dataset-version": "dataset://press-line/2026-01-15", "metadata": {{"reviewed": true}}}}' \\
      >> {outputs}/valohai.metadata.jsonl   # a late line: applied within a second
  .venv/bin/sidecar rejects

Ctrl-C stops everything.
""",
        flush=True,
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo/root"))
