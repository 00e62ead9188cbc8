"""``POST /admin/reload`` of a log-trained artifact goes through the learning loop's gate
(#24): refused with a 409 in the error envelope (estimate and CI in words) when the log's
held-back requests do not show it better, the old artifact serving on; ``force`` skips it."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient

from classifiers import artifact
from tests.router.conftest import Fakes, assert_envelope
from tests.router.test_learning import AUTH, KEY, small_artifact


def _log_trained(path: Path) -> Path:
    small_artifact(path)
    meta = json.loads((path / "meta.json").read_text())
    meta["training_data"] = {"decision_log": "decisions.sqlite", "n_from_log": 40}
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "manifest.json").unlink()  # meta.json is not in the manifest; re-sign anyway
    artifact.sign(path)
    return path


def test_a_log_trained_artifact_without_evidence_is_refused_then_forced(tmp_path: Path) -> None:
    plain = small_artifact(tmp_path / "plain")
    cand = _log_trained(tmp_path / "cand")
    f = Fakes(tmp_path, api_keys=[KEY], admin_api_keys=[KEY], artifact_roots=[str(tmp_path)],
              profiles={"auto": {"policy": "classifier"}, "rules": {"policy": "rules"}},
              default_profile="auto")
    with TestClient(f.app) as client:
        r = client.post("/admin/reload", json={"artifact": str(plain)}, headers=AUTH)
        assert r.status_code == 200 and "gate" not in r.json()  # not log-trained: no gate
        err = assert_envelope(client.post("/admin/reload", json={"artifact": str(cand)},
                                          headers=AUTH), 409, "gate_refused")
        msg = err["message"]
        assert "too few held-back" in msg and "force" in msg and "keeps serving" in msg
        models = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
        assert models["auto"]["artifact"]["sha256"] == artifact.digest(plain)
        r = client.post("/admin/reload", json={"artifact": str(cand), "force": True},
                        headers=AUTH)
        assert r.status_code == 200 and r.json()["gate"] == "skipped (force)"
        models = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
        assert models["auto"]["artifact"]["sha256"] == artifact.digest(cand)
        assert_envelope(client.post("/admin/reload", json={"artifact": str(cand),
                                                           "force": "yes"}, headers=AUTH), 400)


def test_a_guarded_profile_reloads_with_its_guard(tmp_path: Path) -> None:
    """policy: guarded with an artifact and guard.json from the loop: reloads like the
    classifier; a broken guard file is a 400 and the old artifact serves on."""
    import numpy as np

    from classifiers.request import RoutingRequest
    from classifiers.training.estimators import LightGBMRouter
    from router.learning import guard as G

    rng = np.random.default_rng(1)
    X = rng.random((200, 1)) * 8
    clf = LightGBMRouter(n_estimators=20, cv=0, min_child_samples=5).fit(X, (X[:, 0] > 4) * 1)
    a = artifact.save(tmp_path / "a", clf, clf, {"margin": 0.05, "thresholds": {"quality": 0.5, "cost": 0.5}},
                      feature_names=["chars_log"])  # with a "gap" model: the guard needs one
    b = small_artifact(tmp_path / "b")  # none: a guard beside it is refused
    reqs = [RoutingRequest.from_prompt(f"Write a short poem about the sea, number {i}.")
            for i in range(60)]
    lt, lh = np.full(60, 2.0), np.full(60, 1.0)  # the hybrid better by 1 nat/token
    G.save(G.Guard().fit(G.cluster_features(reqs), np.zeros(60), lt, lh), a)
    f = Fakes(tmp_path, api_keys=[KEY], admin_api_keys=[KEY], artifact_roots=[str(tmp_path)],
              profiles={"auto": {"policy": "guarded"}}, default_profile="auto")
    with TestClient(f.app) as client:
        r = client.post("/admin/reload", json={"artifact": str(a)}, headers=AUTH)
        assert r.status_code == 200, r.text
        d = client.post("/v1/route", headers=AUTH, json={
            "model": "auto", "messages": [{"role": "user", "content": reqs[0].text}]}).json()
        assert d["decision"] == "hybrid"
        (b / G.GUARD_FILE).write_text((a / G.GUARD_FILE).read_text())
        err = assert_envelope(client.post("/admin/reload", json={"artifact": str(b)},
                                          headers=AUTH), 400, "reload_failed")
        assert "no gap regressor" in err["message"]
        (b / G.GUARD_FILE).write_text("{}")
        err = assert_envelope(client.post("/admin/reload", json={"artifact": str(b)},
                                          headers=AUTH), 400, "reload_failed")
        assert "guard" in err["message"]
        models = {m["id"]: m for m in client.get("/v1/models", headers=AUTH).json()["data"]}
        assert models["auto"]["artifact"]["sha256"] == artifact.digest(a)
