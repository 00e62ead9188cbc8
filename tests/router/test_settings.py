"""One settings object: defaults < file < environment < CLI, validated, secrets redacted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.registry import parse_spec
from router.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_embedded_pair() -> None:
    s = load_settings(environ={})
    assert s.backends["transformer"].path == "reference:transformer"
    assert s.backends["hybrid"].path == "reference:hybrid"
    assert s.backends["hybrid"].concurrency == 1
    # `archroute`: unset, resolved at start: span where the pair can, else the classifier
    assert s.default_profile is None
    assert s.default_candidates() == ["archroute-span", "archroute-auto"]
    assert s.profiles["archroute-span"].span_gate is not None


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("router-*.yaml")))
def test_example_configs_validate(path: Path) -> None:
    s = load_settings(path, environ={})
    assert set(s.backends) == {"transformer", "hybrid"}


def test_layers_in_order(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 9000\nmax_tokens_cap: 100\n")
    env = {"ARCHROUTE_PORT": "9001", "ARCHROUTE_API_KEYS": "a,b",
           "ARCHROUTE_BACKENDS__HYBRID__TIMEOUT_S": "5"}
    s = load_settings(cfg, {"port": 9002, "host": None}, environ=env)
    assert (s.port, s.max_tokens_cap, s.host) == (9002, 100, "127.0.0.1")
    assert [k.get_secret_value() for k in s.api_keys] == ["a", "b"]
    assert s.backends["hybrid"].timeout_s == 5 and s.backends["hybrid"].name == "reference-hybrid"
    s = load_settings(environ={"ARCHROUTE_CONFIG": str(cfg)})
    assert s.port == 9000


def test_secrets_redacted() -> None:
    s = load_settings(overrides={"api_keys": ["topsecret"], "backends": {
        "transformer": {"name": "t", "kind": "upstream", "base_url": "http://x/v1", "model": "m",
                        "api_key": "upstreamsecret"},
        "hybrid": {"name": "h", "kind": "fake"}}}, environ={})
    text = json.dumps(s.redacted())
    assert "topsecret" not in text and "upstreamsecret" not in text and "**********" in text
    assert "upstreamsecret" not in repr(s)


@pytest.mark.parametrize("data,needle", [
    ({"bogus": 1}, "bogus"),
    ({"port": "x"}, "port"),
    ({"profiles": {"p": {"policy": "rulez"}}, "default_profile": "p"}, "did you mean 'rules'"),
    ({"default_profile": "nope"}, "default_profile"),
    ({"backends": {"transformer": {"name": "a", "kind": "upstream"},
                   "hybrid": {"name": "b", "kind": "fake"}}}, "needs 'base_url'"),
    ({"backends": {"transformer": {"name": "a", "kind": "fake"},
                   "hybrid": {"name": "a", "kind": "fake"}}}, "names must differ"),
    ({"backends": {"transformer": {"name": "a", "kind": "fake"}}}, "exactly"),
])
def test_invalid_settings_say_why(tmp_path: Path, data: dict, needle: str) -> None:
    import yaml

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(SettingsError, match=needle.replace("(", r"\(")) as info:
        load_settings(cfg, environ={})
    assert str(cfg) in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings("/nonexistent.yaml", environ={})


def test_backend_specs() -> None:
    assert parse_spec("reference:hybrid", "hybrid")["name"] == "reference-hybrid"
    up = parse_spec("http://127.0.0.1:8001/v1#allenai/Olmo-3-7B-Instruct", "transformer")
    assert up["kind"] == "upstream" and up["model"] == "allenai/Olmo-3-7B-Instruct"
    assert parse_spec("fake", "hybrid")["kind"] == "fake"


def test_eval_only_policy_refused() -> None:
    with pytest.raises(SettingsError, match="evals only"):
        load_settings(overrides={"profiles": {"o": {"policy": "oracle"}}, "default_profile": "o"},
                      environ={})


def test_api_keys_from_a_file_not_the_command_line(tmp_path, capsys) -> None:
    """Keys given with --api-key show in `ps`; --api-key-file keeps them off the command line."""
    from router.cli import main

    keys = tmp_path / "keys"
    keys.write_text("# router keys\nk-one\n\nk-two\n")
    assert main(["serve", "--api-key-file", str(keys), "--print-settings"]) == 0
    printed = capsys.readouterr().out
    assert "k-one" not in printed and printed.count("*") >= 2  # two keys, redacted
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    assert main(["serve", "--api-key-file", str(empty), "--print-settings"]) == 2


@pytest.mark.parametrize("argv", [["-v", "serve", "--help"], ["serve", "--help"],
                                  ["--verbose", "train", "--help"]])
def test_global_options_before_the_subcommand(argv: list[str], capsys) -> None:
    """`archroute -v serve --help` shows serve's own help (it used to say "serve: not
    available in this build": the subcommand was looked for only as the first argument)."""
    from router.cli import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: archroute {argv[-2]}" in out and "not available" not in out


def test_cli_does_not_rewrite_sys_argv(monkeypatch) -> None:
    import sys

    from router.cli import main

    monkeypatch.setattr(sys, "argv", ["archroute"])
    assert main([]) == 0
    assert sys.argv == ["archroute"]


def test_decision_log_off_with_an_empty_string(tmp_path: Path, monkeypatch, capsys) -> None:
    """`archroute serve --decision-log ''` turns the log off (an unset override is None
    and leaves the default; the empty string used to become None and be dropped too)."""
    monkeypatch.chdir(tmp_path)
    assert load_settings(overrides={"decision_log": ""}, environ={}).decision_log is None
    assert load_settings(overrides={"decision_log": None}, environ={}).decision_log \
        == "archroute-decisions.sqlite"
    from router.cli import main

    capsys.readouterr()
    assert main(["serve", "--decision-log", "", "--print-settings"]) == 0
    assert json.loads(capsys.readouterr().out)["decision_log"] is None


def test_serve_model_limits_in_the_settings_order(tmp_path: Path, monkeypatch, capsys) -> None:
    """`archroute serve-model` takes its limits from the settings' `model_server` section:
    defaults < file < environment < flags, like the router; keys redacted (#13)."""
    from router.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text("model_server: {port: 9100, max_queue: 10, timeout_s: 5}\n"
                   "header_timeout_s: 7\n")
    monkeypatch.setenv("ARCHROUTE_MODEL_SERVER__PORT", "9200")
    monkeypatch.setenv("ARCHROUTE_MODEL_SERVER__MAX_QUEUE", "20")
    monkeypatch.delenv("ARCHROUTE_CONFIG", raising=False)
    capsys.readouterr()
    assert main(["serve-model", "fake", "--config", str(cfg), "--port", "9300",
                 "--api-key", "k-secret", "--print-settings"]) == 0
    out = json.loads(capsys.readouterr().out)
    ms = out["model_server"]
    assert (ms["port"], ms["max_queue"], ms["timeout_s"]) == (9300, 20, 5.0)  # flag, env, file
    assert ms["max_tokens_cap"] == 4096 and ms["host"] == "127.0.0.1"  # defaults
    assert ms["api_keys"] == ["**********"] and out["header_timeout_s"] == 7.0
    cfg.write_text("model_server: {queue_size: 10}\n")  # unknown keys are rejected
    assert main(["serve-model", "fake", "--config", str(cfg), "--print-settings"]) == 2


def test_serve_model_app_enforces_its_settings() -> None:
    from fastapi.testclient import TestClient

    from models.fake import FakeBackend
    from router.model_server import create_model_app
    from router.settings import ModelServerSettings

    limits = ModelServerSettings(api_keys=["k"], max_body_bytes=2048, max_tokens_cap=1)
    with TestClient(create_model_app(FakeBackend("m", default_reply="a b c"), "m", limits)) as c:
        body = {"model": "m", "prompt": "hi", "max_tokens": 50}
        assert c.post("/v1/completions", json=body).status_code == 401
        auth = {"authorization": "Bearer k"}
        r = c.post("/v1/completions", json=body, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
        big = {**body, "prompt": "x" * 4096}
        assert c.post("/v1/completions", json=big, headers=auth).status_code == 413


def test_the_projects_other_variables_are_not_settings_but_typos_are_errors() -> None:
    """ARCHROUTE_CACHE, ARCHROUTE_REQUESTS, ... configure other parts of the project and are
    skipped; an ARCHROUTE_* that names no setting is refused with its name."""
    s = load_settings(environ={"ARCHROUTE_CACHE": "/tmp/x", "ARCHROUTE_REQUESTS": "/data",
                               "ARCHROUTE_VENV": ".venv", "ARCHROUTE_PORT": "9100"})
    assert s.port == 9100
    with pytest.raises(SettingsError, match="prot"):
        load_settings(environ={"ARCHROUTE_PROT": "9100"})


def test_the_embedded_config_is_the_no_config_default():
    """configs/router-embedded.yaml says it is what `archroute serve` does with no config
    (issue #27 item 8: it lacked the span profile): it names every setting but
    default_profile (unset by design), and each has its default value, but the decision
    log's path."""
    import yaml

    from router.settings import Settings

    path = ROOT / "configs" / "router-embedded.yaml"
    assert set(Settings.model_fields) - set(yaml.safe_load(path.read_text())) == {
        "default_profile"}
    from_file = load_settings(str(path), environ={}).model_dump(mode="json")
    default = load_settings(environ={}).model_dump(mode="json")
    diff = {k for k in default if k != "decision_log" and from_file[k] != default[k]}
    assert not diff, {k: (from_file[k], default[k]) for k in diff}


def test_which_profiles_are_the_built_in_ones(tmp_path: Path) -> None:
    """A span profile the pair cannot serve stops the router when configured, and is left
    out when built in (router/span.py): the settings know which is which. A file's
    ``profiles`` configure them all; a flag or variable that names one configures it."""
    from router.settings import Settings

    builtin = {"archroute-span", "archroute-auto", "archroute-cost", "archroute-rules"}
    assert load_settings(environ={}).builtin_profiles() == builtin
    assert Settings().builtin_profiles() == builtin
    assert Settings(profiles={"archroute-rules": {}}).builtin_profiles() == set()
    s = load_settings(overrides={"profiles": {"archroute-span": {"policy_args": {
        "gate": "copy-2"}}, "mine": {"policy": "rules"}}}, environ={})
    assert s.builtin_profiles() == builtin - {"archroute-span"}
    assert s.profiles["archroute-span"].span_gate == "copy-2"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("profiles:\n  archroute-span: {policy: span}\n")
    assert load_settings(cfg, environ={}).builtin_profiles() == set()
    s = load_settings(cfg, environ={})
    s.port = 9000  # a later assignment keeps it
    assert s.builtin_profiles() == set()
