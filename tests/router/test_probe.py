"""The prompt probe as a router policy (issue #24 item 4), on the fake pair: the router asks
both backends for the prompt's log-probabilities before a ``probe`` profile scores, routes
by them, records them, and falls back to the prompt-only classifier when a probe fails."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from classifiers import artifact
from classifiers.probe import PROBE_FEATURES
from classifiers.request import RoutingRequest
from models.fake import FakeBackend
from router.app import create_app
from router.policies import get_policy
from router.settings import SettingsError, load_settings
from tests.router.probe_fixtures import fake_prompt, train_fake_probe_artifact

PROFILE = "archroute-probe"


@pytest.fixture(scope="module")
def probe_artifact(tmp_path_factory) -> Path:
    return train_fake_probe_artifact(tmp_path_factory.mktemp("probe") / "artifact")


class ProbeRouter:
    """A router app on the fake pair with one probe profile."""

    def __init__(self, tmp_path: Path, art: Path, **overrides: object) -> None:
        self.settings = load_settings(overrides={
            "backends": {"transformer": {"name": "t-fake", "kind": "fake"},
                         "hybrid": {"name": "h-fake", "kind": "fake"}},
            "decision_log": str(tmp_path / "decisions.sqlite"),
            "profiles": {PROFILE: {"policy": "probe", "policy_args": {"artifact": str(art)}}},
            **overrides}, environ={})
        self.transformer = FakeBackend("t-fake", "transformer", default_reply="from transformer")
        self.hybrid = FakeBackend("h-fake", "hybrid", default_reply="from hybrid")
        self.app = create_app(self.settings, backends={"transformer": self.transformer,
                                                       "hybrid": self.hybrid})

    def rows(self) -> list[dict]:
        self.app.state.service.decision_log.flush()
        db = sqlite3.connect(str(self.settings.decision_log))
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM decisions ORDER BY id")]


def chat(client: TestClient, text: str):
    r = client.post("/v1/chat/completions", json={
        "model": PROFILE, "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r


def test_routes_by_the_probe_and_records_it(tmp_path: Path, probe_artifact: Path) -> None:
    rng = np.random.default_rng(7)
    repeated, fresh = fake_prompt(rng, repeats=3), fake_prompt(rng, repeats=0)
    f = ProbeRouter(tmp_path, probe_artifact)
    with TestClient(f.app) as client:
        a, b = chat(client, repeated), chat(client, fresh)
        metrics = client.get("/metrics").text
    # the fake transformer reads a repeated phrase better: the probe sends it there
    assert a.headers["x-archroute-backend"] == "t-fake"
    assert b.headers["x-archroute-backend"] == "h-fake"
    assert float(a.headers["x-archroute-probe-ms"]) > 0
    # both backends read each prompt once, before the chosen one generated
    assert [m for m, _ in f.transformer.calls] == ["score_prompt", "generate", "score_prompt"]
    assert [m for m, _ in f.hybrid.calls] == ["score_prompt", "score_prompt", "generate"]
    rows = f.rows()
    assert [r["policy"] for r in rows] == ["probe", "probe"]
    feats = [json.loads(r["features"]) for r in rows]
    assert set(PROBE_FEATURES) - {"probe_gap_close"} <= set(feats[0])
    assert feats[0]["probe_gap"] < 0 == feats[1]["probe_gap"]  # the fake's prompt losses
    assert feats[0]["probe_ms"] > 0
    assert "archroute_probe_seconds_count 2.0" in metrics
    assert "archroute_probe_fallbacks_total{" not in metrics  # none fell back


@pytest.mark.parametrize("broken", ["fail", "slow", "unable"])
def test_a_failed_probe_scores_without_it(tmp_path: Path, probe_artifact: Path,
                                          broken: str) -> None:
    f = ProbeRouter(tmp_path, probe_artifact, probe_timeout_s=0.3)
    with TestClient(f.app) as client:
        if broken == "fail":
            f.hybrid.fail(1)  # its probe call fails; the generation after it is served
        elif broken == "slow":
            f.hybrid.delay_s = 1.0
        else:  # a backend kind without prompt scoring is not asked
            f.hybrid.can_score_prompt = False
        r = chat(client, fake_prompt(np.random.default_rng(1), repeats=0))
        if broken == "fail":
            f.hybrid.fail(1)
        route = client.post("/v1/route", json={
            "model": PROFILE, "messages": [{"role": "user", "content": "hello there"}]}).json()
        metrics = client.get("/metrics").text
    reason = {"fail": "error", "slow": "timeout", "unable": "refused"}[broken]
    assert r.json()["archroute"]["policy"] == "probe+prompt-only"
    prompt_only = get_policy("classifier")
    assert r.json()["archroute"]["threshold"] == pytest.approx(prompt_only.default_threshold())
    assert any("the prompt probe failed" in s for s in route["reasons"])
    assert f'archroute_probe_fallbacks_total{{profile="{PROFILE}",reason="{reason}"}} 2.0' in metrics
    row = f.rows()[0]
    assert not set(PROBE_FEATURES) & set(json.loads(row["features"]))
    if broken == "slow":  # no verdict against a slow backend: its breaker stays closed
        assert f.app.state.service.slots["hybrid"].state == "closed"
    if broken == "unable":
        assert "score_prompt" not in [m for m, _ in f.hybrid.calls]


def test_start_up_errors_name_the_fix(tmp_path: Path) -> None:
    base = {"backends": {"transformer": {"name": "t", "kind": "fake"},
                         "hybrid": {"name": "h", "kind": "fake"}}, "decision_log": ""}
    for args, says in [({}, "needs policy_args.artifact"),
                       ({"artifact": str(tmp_path / "none")}, "no readable artifact"),
                       ({"artifact": str(artifact.DEFAULT_DIR)}, "trained without the prompt probe")]:
        with pytest.raises(SettingsError) as info:
            load_settings(overrides={**base, "profiles": {"p": {"policy": "probe",
                                                                "policy_args": args}}},
                          environ={})
        assert says in str(info.value) and "archroute train --probe" in str(info.value)
        assert "profiles.p:" in str(info.value)  # the settings' own format: which profile
    with pytest.raises(ValueError, match="trained without the prompt probe"):
        get_policy("probe", artifact=str(artifact.DEFAULT_DIR))


def test_the_artifact_reads_probe_values_by_name(probe_artifact: Path) -> None:
    clf = artifact.load(probe_artifact)
    assert clf.needs_probe and clf.probe_names == PROBE_FEATURES
    req = RoutingRequest.from_prompt("Say it again: lamp stone lamp stone")
    probe = {k: float(i) / 10 for i, k in enumerate(reversed(PROBE_FEATURES))}  # any order
    _, named = clf.named_features(RoutingRequest(req.messages, None, req.kind, probe))
    assert {k: named[k] for k in PROBE_FEATURES} == pytest.approx(probe)
    _, missing = clf.named_features(req)  # no probe measured: NaN, never a made-up value
    assert all(np.isnan(missing[k]) for k in PROBE_FEATURES)
    assert not artifact.load(artifact.DEFAULT_DIR).needs_probe
