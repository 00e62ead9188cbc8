"""Artifacts that cannot hurt the process that loads them (#21 N2): atomic writes with a
manifest of sizes and sha256, checked before LightGBM parses a byte; artifacts without a
manifest loaded first in a child process, whose native abort is a refusal, not a crash."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from classifiers import artifact, integrity
from classifiers.training.estimators import LightGBMRouter


def fitted(flip: bool = False) -> LightGBMRouter:
    rng = np.random.default_rng(1)
    X = rng.random((200, 1)) * 8
    y = (X[:, 0] > 4).astype(int)
    return LightGBMRouter(n_estimators=20, cv=0, min_child_samples=5).fit(X, 1 - y if flip else y)


def small(path: Path, flip: bool = False, regressor: bool = False) -> Path:
    clf = fitted(flip)
    reg = fitted(not flip) if regressor else None
    return artifact.save(path, clf, reg, meta={"created_utc": "2026-01-01T00:00:00Z",
                                              "thresholds": {"quality": 0.5, "cost": 0.5}},
                         feature_names=["chars_log"])


def copy_without_manifest(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / integrity.MANIFEST).unlink(missing_ok=True)
    return dst


def test_save_writes_a_manifest_of_the_model_files(tmp_path: Path) -> None:
    art = small(tmp_path / "a", regressor=True)
    m = json.loads((art / integrity.MANIFEST).read_text())
    assert set(m["files"]) == {"classifier.txt", "regressor.txt"}
    for name, entry in m["files"].items():
        data = (art / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": integrity.sha256(data)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary folder left


def test_save_replaces_an_artifact_whole_and_refuses_other_folders(tmp_path: Path) -> None:
    art = small(tmp_path / "a", regressor=True)
    before = artifact.digest(art)
    small(tmp_path / "a", flip=True)  # no regressor this time: the old one must not linger
    assert not (art / "regressor.txt").exists()
    assert artifact.digest(art) != before
    assert artifact.load(art).meta["regressor_is_classifier"] is False
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("keep me")
    with pytest.raises(artifact.ArtifactError, match="other files"):
        small(tmp_path / "runs")
    assert (tmp_path / "runs" / "notes.txt").read_text() == "keep me"


def test_a_write_that_fails_midway_leaves_the_old_artifact(tmp_path: Path, monkeypatch) -> None:
    art = small(tmp_path / "a")
    before = artifact.digest(art)

    def crash(_path: Path) -> None:
        raise OSError("disk full")

    clf = fitted(flip=True)
    monkeypatch.setattr(type(clf.booster_), "model_to_string", lambda self: crash(art))
    with pytest.raises(OSError, match="disk full"):
        artifact.save(art, clf, feature_names=["chars_log"])
    assert artifact.digest(art) == before
    assert artifact.load(art).sha256 == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize("damage,needle", [
    (lambda a: os.truncate(a / "classifier.txt", 2000), "2000 bytes, expected"),
    (lambda a: os.truncate(a / "classifier.txt", 0), "0 bytes, expected"),
    (lambda a: (a / "classifier.txt").write_bytes(
        (a / "classifier.txt").read_bytes().replace(b"tree", b"treX", 1)), "sha256"),
    (lambda a: (a / "regressor.txt").unlink(), "listed in manifest.json but missing"),
])
def test_a_damaged_artifact_is_refused_before_any_parser(tmp_path: Path, monkeypatch, damage,
                                                         needle) -> None:
    art = small(tmp_path / "a", regressor=True)
    damage(art)
    import lightgbm

    def no_parse(*a, **k):
        raise AssertionError("LightGBM parsed an unchecked file")

    monkeypatch.setattr(lightgbm, "Booster", no_parse)
    with pytest.raises(artifact.ArtifactError, match=needle):
        artifact.load(art, strict=True)


def test_a_model_file_the_manifest_does_not_list_is_refused(tmp_path: Path) -> None:
    art = small(tmp_path / "a")
    shutil.copy(art / "classifier.txt", art / "regressor.txt")
    with pytest.raises(artifact.ArtifactError, match="regressor.txt is not in manifest.json"):
        artifact.load(art)


def test_an_invalid_manifest_is_refused(tmp_path: Path) -> None:
    art = small(tmp_path / "a")
    (art / integrity.MANIFEST).write_text('{"files": {"classifier.txt": 3}}')
    with pytest.raises(artifact.ArtifactError, match="not a valid manifest"):
        artifact.load(art)


def test_without_a_manifest_a_crashing_file_kills_a_child_not_us(tmp_path: Path) -> None:
    """The issue's repro: the shipped artifact with its LightGBM file cut to 2,000 bytes
    crashes LightGBM's parser (SIGABRT or SIGSEGV, depending on where the cut falls);
    loaded here, only the child dies."""
    art = copy_without_manifest(artifact.DEFAULT_DIR, tmp_path / "cut")
    os.truncate(art / "classifier.txt", 2000)
    with pytest.raises(artifact.ArtifactError, match="crashed the loader.*SIG(ABRT|SEGV)"):
        artifact.load(art, strict=True)
    with pytest.raises(artifact.ArtifactError, match="crashed the loader"):
        artifact.sign(art)  # never signed
    assert not (art / integrity.MANIFEST).exists()


def test_without_a_manifest_a_good_artifact_loads_after_the_child_check(tmp_path: Path,
                                                                         monkeypatch) -> None:
    art = copy_without_manifest(small(tmp_path / "a"), tmp_path / "old")
    calls = []
    real = integrity.check_in_child

    def spy(*a, **k):
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(artifact, "check_in_child", spy)
    clf = artifact.load(art, strict=True)
    assert calls == [art] and clf.sha256 == artifact.digest(art)
    # the child's errors come back as they are
    meta = json.loads((art / "meta.json").read_text())
    meta["self_check"][0]["p_transformer"] += 0.3
    (art / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(artifact.ArtifactError, match="self-check failed"):
        artifact.load(art, strict=True)


def test_a_file_that_changes_during_the_child_check_is_refused(tmp_path: Path) -> None:
    art = copy_without_manifest(small(tmp_path / "a"), tmp_path / "old")
    blobs = {n: (art / n).read_bytes() for n in artifact.ARTIFACT_FILES if (art / n).is_file()}
    blobs["classifier.txt"] += b"\n"  # what we read differs from what the child read
    with pytest.raises(artifact.ArtifactError, match="changed while"):
        integrity.check_in_child(art, blobs, strict=False)


def test_sign_adds_a_manifest_without_changing_the_artifact(tmp_path: Path) -> None:
    art = copy_without_manifest(small(tmp_path / "a"), tmp_path / "old")
    before = artifact.digest(art)
    m = artifact.sign(art)
    assert set(m["files"]) == {"classifier.txt"} and artifact.digest(art) == before
    os.truncate(art / "classifier.txt", 100)
    with pytest.raises(artifact.ArtifactError, match="100 bytes, expected"):
        artifact.load(art)


def test_the_shipped_default_carries_a_manifest_and_loads_without_a_child(monkeypatch) -> None:
    def no_child(*a, **k):
        raise AssertionError("the shipped artifact needed an isolated load")

    monkeypatch.setattr(artifact, "check_in_child", no_child)
    m = json.loads((artifact.DEFAULT_DIR / integrity.MANIFEST).read_text())
    assert set(m["files"]) == {n for n in artifact.MODEL_FILES
                               if (artifact.DEFAULT_DIR / n).exists()}
    clf = artifact.load(artifact.DEFAULT_DIR, strict=True)
    assert clf.identity() == {"name": "default", "sha256": artifact.digest(artifact.DEFAULT_DIR),
                              "created_utc": clf.meta["created_utc"]}
