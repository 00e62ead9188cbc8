"""The backend registry (models/registry.py): one spec grammar, one build, every kind
satisfying the Backend contract."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from models import registry
from models.base import Backend, BackendInfo
from models.fake import FakeBackend
from models.registry import BackendConfig, BackendSpecError, build, from_spec, parse_spec


def test_spec_grammar() -> None:
    assert parse_spec("reference:hybrid") == {"name": "reference-hybrid", "kind": "hf",
                                              "path": "reference:hybrid"}
    assert parse_spec("/models/olmo-3-7b") == {"name": "olmo-3-7b", "kind": "hf",
                                               "path": "/models/olmo-3-7b"}
    assert parse_spec("https://h:8000/v1#org/M") == {
        "name": "org-M", "kind": "upstream", "base_url": "https://h:8000/v1", "model": "org/M"}
    assert parse_spec("fake", "hybrid") == {"name": "fake-hybrid", "kind": "fake"}
    assert parse_spec("fake:hi there") == {"name": "fake", "kind": "fake", "fake_reply": "hi there"}
    with pytest.raises(BackendSpecError, match="URL#MODEL"):
        parse_spec("http://h:8000/v1")
    with pytest.raises(BackendSpecError, match="empty"):
        parse_spec("")


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(BackendSpecError, match="hf, upstream, fake"):
        build(BackendConfig(name="x", kind="tpu"))


def _kinds_built(reference: bool) -> list[Backend]:
    out = [from_spec("fake:ok", role="hybrid"),
           from_spec("http://127.0.0.1:9/v1#m", role="transformer")]
    if reference:
        out.append(from_spec("reference:transformer", torch_threads=1))
    return out


def test_every_kind_satisfies_the_backend_contract(reference_pair) -> None:
    """Every registered kind builds from a spec and has the contract's methods: info,
    generate/stream/score and their async forms, close and aclose."""
    built = _kinds_built(reference=True)
    assert {type(b).__module__.split(".")[-1] for b in built} == {"fake", "upstream", "hf"}
    assert set(registry.KINDS) == {"hf", "upstream", "fake"}  # a new kind: add it above
    for b in built:
        assert isinstance(b, Backend)
        info = b.info()
        assert isinstance(info, BackendInfo) and info.name == b.name
        for m in ("generate", "stream", "score", "score_batch", "close"):
            assert callable(getattr(b, m))
        for m in ("agenerate", "astream", "ascore", "aclose"):
            f = getattr(b, m)
            assert inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f), (b, m)
        asyncio.run(b.aclose())
    assert built[0].info().architecture == "hybrid"  # the role is the stated architecture
    assert built[1].info().architecture == "transformer"


def test_a_new_kind_is_one_function_and_one_line(monkeypatch) -> None:
    """What docs/ARCHITECTURE.md shows: register "module:function" and the router, the
    CLI and the harness can build it."""
    monkeypatch.setitem(registry.KINDS, "echo", f"{__name__}:_build_echo")
    b = build(BackendConfig(name="e", kind="echo", fake_reply="echo!"), role="transformer")
    assert isinstance(b, FakeBackend) and b.name == "e" and b.default_reply == "echo!"

    from router.settings import load_settings

    s = load_settings(overrides={"backends": {
        "transformer": {"name": "e1", "kind": "echo"}, "hybrid": {"name": "f", "kind": "fake"}}},
        environ={})
    assert s.backends["transformer"].kind == "echo"


def _build_echo(cfg, role=None, torch_threads=None) -> FakeBackend:
    return FakeBackend(cfg.name, role or "other", default_reply=cfg.fake_reply)


def test_settings_refuse_an_unknown_kind() -> None:
    from router.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="unknown kind 'tpu'"):
        load_settings(overrides={"backends": {"transformer": {"name": "a", "kind": "tpu"},
                                              "hybrid": {"name": "b", "kind": "fake"}}},
                      environ={})
