from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.fake import FakeBackend
from router.app import create_app
from router.settings import Settings, load_settings


def fake_settings(tmp_path: Path, **overrides: object) -> Settings:
    base = {"backends": {"transformer": {"name": "t-fake", "kind": "fake"},
                         "hybrid": {"name": "h-fake", "kind": "fake"}},
            "decision_log": str(tmp_path / "decisions.sqlite")}
    return load_settings(overrides={**base, **overrides}, environ={})


class Fakes:
    """A router app on two fake backends; ``client`` talks to it in-process."""

    def __init__(self, tmp_path: Path, **overrides: object) -> None:
        self.settings = fake_settings(tmp_path, **overrides)
        self.transformer = FakeBackend("t-fake", "transformer", default_reply="from transformer")
        self.hybrid = FakeBackend("h-fake", "hybrid", default_reply="from hybrid")
        self.app = create_app(self.settings, backends={"transformer": self.transformer,
                                                       "hybrid": self.hybrid})


@pytest.fixture()
def fakes(tmp_path: Path) -> Iterator[tuple[Fakes, TestClient]]:
    f = Fakes(tmp_path)
    with TestClient(f.app) as client:
        yield f, client


def assert_envelope(r, status: int, code: str | None = None) -> dict:
    """The response has ``status`` and OpenAI's error envelope (and ``code``, if given)."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    return err
