"""The HTTP edge's pure parts: loopback binds, the exposure check, and `sidecar serve` refusing."""

from __future__ import annotations

import pytest

from worker.cli import main
from worker.edge import exposure_warning, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("sidecar.example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_exposure_warning() -> None:
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", "t0ken") is None
    warning = exposure_warning("0.0.0.0", None)
    assert warning is not None and "0.0.0.0" in warning and "SIDECAR_API_TOKEN" in warning


def test_serve_refuses_an_exposed_bind_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SIDECAR_API_TOKEN", raising=False)
    # Refused before anything is opened: no database, Redis or socket is touched.
    assert main(["serve", "--host", "0.0.0.0", "--database-url", "sqlite:///nowhere/x.db"]) == 1
    err = capsys.readouterr().err
    assert "--insecure" in err and "SIDECAR_API_TOKEN" in err


def test_serve_insecure_only_warns(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    ran: list[str] = []
    monkeypatch.delenv("SIDECAR_API_TOKEN", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda _app, host, **_kw: ran.append(host))
    monkeypatch.setattr("worker.cli._freeze_startup_objects", lambda: None)
    monkeypatch.setattr("worker.cli.signal.signal", lambda *_args: None)
    argv = ["serve", "--host", "0.0.0.0", "--insecure", "--redis-url", "redis://127.0.0.1:1/0"]
    assert main([*argv, "--database-url", "sqlite://"]) == 0
    assert ran == ["0.0.0.0"]
    assert "not a loopback address" in capsys.readouterr().err  # the CLI's own log handler
