"""MLflow in its own virtualenv, `bench/peers/.venv-mlflow` (git-ignored), made once and reused.

MLflow pins its own SQLAlchemy, Alembic, protobuf, pydantic and FastAPI; installed into the
project's `.venv` it would change what the sidecar itself runs on. So it lives apart and the bench
talks to it through a subprocess (`mlflow_runner.py`) and files.

`mlflow-skinny` 3.17 carries the SQLAlchemy tracking store (`mlflow.store.tracking.sqlalchemy_store`
and its models) but not the database packages the full `mlflow` depends on; SQLAlchemy and Alembic
are added by hand. A marker file names what was installed: a changed `REQUIREMENTS` makes a new
virtualenv.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-mlflow"
REQUIREMENTS = ("mlflow-skinny==3.17.*", "sqlalchemy>=2,<3", "alembic>=1.13,<2")
_MARKER = VENV / "bench-requirements.json"


def python() -> Path:
    return VENV / "bin" / "python"


def ensure(log: Path) -> Path:
    """The virtualenv's python, after creating and filling the virtualenv if it is missing or was
    made for other requirements; pip's output goes to `log`."""
    if _MARKER.exists() and json.loads(_MARKER.read_text()) == list(REQUIREMENTS) and python().exists():
        return python()
    shutil.rmtree(VENV, ignore_errors=True)
    with open(log, "ab") as out:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, stdout=out, stderr=out)
        subprocess.run(
            [str(python()), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
            check=True,
            stdout=out,
            stderr=out,
            timeout=900,
        )
    # Written last: an interrupted install leaves no marker and is redone next time.
    _MARKER.write_text(json.dumps(list(REQUIREMENTS)))
    return python()


def versions() -> dict[str, str]:
    """What the virtualenv holds of MLflow, SQLAlchemy and Alembic (for the results file)."""
    code = (
        "import json, mlflow, sqlalchemy, alembic;"
        "print(json.dumps({'mlflow': mlflow.__version__, 'sqlalchemy': sqlalchemy.__version__,"
        " 'alembic': alembic.__version__}))"
    )
    out = subprocess.run([str(python()), "-c", code], check=True, capture_output=True, text=True)
    found: dict[str, str] = json.loads(out.stdout)
    return found
