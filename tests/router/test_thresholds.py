"""Profile thresholds: a classifier profile without one uses the artifact's threshold for its
operating point (quality / cost), an explicit one wins, and `/v1/models` shows the one used."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from classifiers import artifact
from classifiers.training.estimators import LightGBMRouter
from router.policies import DEFAULT_THRESHOLD, get_policy
from router.settings import ProfileSettings
from tests.router.conftest import Fakes

THRESHOLDS = {"quality": 0.37, "cost": 0.81}
PROSE = [{"role": "user", "content": "Write a short poem about the sea at dusk."}]


@pytest.fixture(autouse=True)
def _no_default_artifact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default profiles' classifier loads no shipped artifact here: rules fallback, 0.5."""
    import router.policies

    def unavailable():
        raise artifact.ArtifactError("no default artifact in this test")

    monkeypatch.setattr(router.policies, "_DEFAULT_MODEL", [])
    monkeypatch.setattr(artifact, "load_default", unavailable)


def _artifact(path: Path, thresholds: dict[str, float] | None = THRESHOLDS) -> Path:
    """A small format-2 artifact on two of the request features."""
    rng = np.random.default_rng(0)
    X = rng.random((80, 2))
    clf = LightGBMRouter(n_estimators=10, cv=0, min_child_samples=5).fit(
        X, (X[:, 0] > 0.5).astype(int))
    meta = {"margin": 0.05} | ({"thresholds": thresholds} if thresholds is not None else {})
    return artifact.save(path, clf, meta=meta, feature_names=["chars_log", "turns"])


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    return _artifact(tmp_path_factory.mktemp("art") / "artifact")


def _profiles(art: Path) -> dict:
    a = str(art)
    return {
        "c-default": {"policy": "classifier", "policy_args": {"artifact": a}},
        "c-quality": {"policy": "classifier",
                      "policy_args": {"artifact": a, "operating_point": "quality"}},
        "c-cost": {"policy": "classifier", "policy_args": {"artifact": a, "operating_point": "cost"}},
        "c-explicit": {"policy": "classifier", "threshold": 0.2,
                       "policy_args": {"artifact": a, "operating_point": "cost"}},
        "c-zero": {"policy": "classifier", "threshold": 0.0, "policy_args": {"artifact": a}},
        "r-default": {"policy": "rules"},
        "r-explicit": {"policy": "rules", "threshold": 0.9},
    }


def test_profile_threshold_defaults_to_none() -> None:
    assert ProfileSettings().threshold is None
    assert ProfileSettings(threshold=0.3).threshold == 0.3
    with pytest.raises(ValueError):
        ProfileSettings(threshold=1.5)


def test_policy_default_thresholds(art: Path, tmp_path: Path) -> None:
    assert get_policy("rules").default_threshold() == DEFAULT_THRESHOLD == 0.5
    assert get_policy("classifier", artifact=str(art)).default_threshold() == 0.37
    assert get_policy("classifier", artifact=str(art),
                      operating_point="quality").default_threshold() == 0.37
    assert get_policy("classifier", artifact=str(art),
                      operating_point="cost").default_threshold() == 0.81
    # an artifact without thresholds, or the rules fallback: 0.5
    bare = _artifact(tmp_path / "bare", thresholds=None)
    assert get_policy("classifier", artifact=str(bare),
                      operating_point="cost").default_threshold() == DEFAULT_THRESHOLD
    fallback = get_policy("classifier", operating_point="cost")
    assert fallback.fallback_ and fallback.default_threshold() == DEFAULT_THRESHOLD  # type: ignore[attr-defined]
    assert get_policy("classifier", artifact=str(art)).params()["operating_point"] == "quality"


def test_bogus_operating_point_is_a_clear_value_error(art: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"operating_point must be 'quality', 'cost' or 'risk-ALPHA'.*'bogus'"):
        get_policy("classifier", artifact=str(art), operating_point="bogus")
    # a profile with it: the router refuses to start, with the same message
    f = Fakes(tmp_path, profiles={"bad": {"policy": "classifier", "policy_args": {
        "artifact": str(art), "operating_point": "bogus"}}})
    with pytest.raises(ValueError, match="operating_point"), TestClient(f.app):
        pass


def test_service_resolves_each_profiles_threshold(art: Path, tmp_path: Path) -> None:
    f = Fakes(tmp_path, profiles=_profiles(art))
    with TestClient(f.app) as client:
        thr = f.app.state.service.thresholds
        assert thr["c-default"] == 0.37 and thr["c-quality"] == 0.37
        assert thr["c-cost"] == 0.81
        assert thr["c-explicit"] == 0.2  # an explicit threshold wins over the artifact's
        assert thr["c-zero"] == 0.0  # ... even 0 (not mistaken for "unset")
        assert thr["r-default"] == 0.5 and thr["r-explicit"] == 0.9
        # the built-in profiles, with no artifact to load: the rules fallback's 0.5
        assert thr["archroute-auto"] == thr["archroute-cost"] == 0.5

        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        for name, t in thr.items():
            assert cards[name]["threshold"] == t, name
        assert cards["c-cost"]["threshold"] == 0.81 and cards["c-explicit"]["threshold"] == 0.2
        one = client.get("/v1/models/c-cost").json()
        assert one["threshold"] == 0.81 and one["policy"] == "classifier"


def test_requests_are_routed_at_the_resolved_threshold(art: Path, tmp_path: Path) -> None:
    f = Fakes(tmp_path, profiles=_profiles(art))
    with TestClient(f.app) as client:
        for name, thr in (("c-quality", 0.37), ("c-cost", 0.81), ("c-explicit", 0.2)):
            r = client.post("/v1/chat/completions", json={"model": name, "messages": PROSE})
            assert r.status_code == 200, r.text
            d = r.json()["archroute"]
            assert d["threshold"] == thr
            score = float(r.headers["x-archroute-score"])
            assert d["decision"] == ("transformer" if score >= thr else "hybrid")
            assert d["policy"] == "classifier"  # the artifact, not the rules fallback
        # a per-request threshold still wins over the profile's
        r = client.post("/v1/chat/completions", json={"model": "c-cost", "messages": PROSE,
                                                      "archroute": {"threshold": 0.0}})
        assert r.json()["archroute"]["threshold"] == 0.0
        assert r.json()["archroute"]["decision"] == "transformer"
        r = client.post("/v1/chat/completions", json={"model": "c-zero", "messages": PROSE})
        assert r.json()["archroute"]["decision"] == "transformer"


def test_default_profiles_use_the_default_artifacts_operating_points(
        art: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifact, "load_default", lambda: artifact.load(art))
    f = Fakes(tmp_path)
    with TestClient(f.app) as client:
        cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert cards["archroute-auto"]["threshold"] == 0.37
        assert "archroute-quality" not in cards  # deprecated: archroute-auto
        assert cards["archroute-cost"]["threshold"] == 0.81
        assert cards["archroute-rules"]["threshold"] == 0.5
        r = client.post("/v1/chat/completions", json={"model": "archroute", "messages": PROSE})
        assert r.json()["archroute"]["profile"] == "archroute-auto"
        assert r.json()["archroute"]["threshold"] == 0.37
        # the old name still works, as the profile it became, and says so
        r = client.post("/v1/chat/completions", json={"model": "archroute-quality",
                                                      "messages": PROSE})
        assert r.status_code == 200, r.text
        assert r.json()["archroute"]["profile"] == "archroute-auto"
        assert r.json()["archroute"]["threshold"] == 0.37
        assert "use that name" in r.headers["x-archroute-deprecated"]


def test_startup_log_names_the_resolved_threshold(art: Path, tmp_path: Path, caplog) -> None:
    f = Fakes(tmp_path, profiles=_profiles(art))
    with caplog.at_level(logging.INFO, logger="router.app"), TestClient(f.app):
        pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("profile c-")]
    assert any(line.startswith("profile c-cost:") and line.endswith("threshold 0.810")
               for line in lines), lines
    assert any(line.startswith("profile c-explicit:") and line.endswith("threshold 0.200")
               for line in lines), lines
