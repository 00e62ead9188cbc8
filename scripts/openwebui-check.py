"""Open WebUI against a real `archroute serve`, offline, driven through Open WebUI's own HTTP
API the way its chat page drives it (issue #15). Run with the project's .venv python after
scripts/openwebui-env (or just `./dev openwebui`):

    .venv/bin/python scripts/openwebui-check.py [--usage-capability] [--max-tokens N] [--fake]

It starts `archroute serve` (the embedded reference pair; --fake: two fake backends) with a
decision log and prompt logging, and Open WebUI from .venv-openwebui pointed at it, offline,
with a fresh data directory (runs/openwebui-check/: logs, Open WebUI's data, the decision log).
Then, as the page does: sign in (auth off: the automatic admin), list the models and pick the
default one (the page's rule: the user's saved models, then the admin's default models, then
the first model listed), send a new chat's first message (streamed, with the background tasks
title, tags and follow-ups), then a second message in the same chat (follow-ups), and wait for
Open WebUI to finish and store them. Both servers are stopped at the end, whatever happens.

The bar, checked on what the router logged and what Open WebUI stored:
  1. `archroute` (the default profile) is listed and is the model the page picks;
  2. no 4xx among the router's requests; the title/tags/follow-up requests are side requests;
  3. each stored answer carries `usage.archroute_backend` (the message's info tooltip in
     Open WebUI shows the stored usage), equal to the backend the router logged.

Open WebUI asks a streaming provider for usage (`stream_options.include_usage`) only for
models with the "usage" capability, off by default; --usage-capability turns it on for every
model (DEFAULT_MODEL_METADATA, as the admin's Settings > Models > default capabilities would).
--max-tokens N sends N as the chat's max_tokens (a chat-controls setting; 0: none, as Open
WebUI's default, so the router generates up to the context).

Prints a summary and exits 0 when every bar item passes, 1 otherwise, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WEBUI_VENV = Path(os.environ.get("ARCHROUTE_OPENWEBUI_VENV", ROOT / ".venv-openwebui"))
RUN_DIR = ROOT / "runs" / "openwebui-check"
TURNS = ("What is the capital of France?", "And what is its population?")


class CheckError(Exception):
    """The check could not run (a server did not start, a wait ran out)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: Any = None, token: str | None = None,
         timeout: float = 60.0) -> tuple[int, Any]:
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def wait_for(what: str, probe: Any, timeout: float, proc: subprocess.Popen | None = None,
             log: Path | None = None, every: float = 0.5) -> Any:
    """Calls ``probe()`` until it returns something truthy (then returned), at most ``timeout``
    seconds; fails early when ``proc`` exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise CheckError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            got = probe()
        except (OSError, urllib.error.URLError, sqlite3.Error):
            got = None
        if got:
            return got
        time.sleep(every)
    raise CheckError(f"{what}: not within {timeout:.0f} s")


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM to the process group it leads (started with start_new_session), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def webui_env(router_url: str, data_dir: Path, usage_capability: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_"))}
    env.update({
        "DATA_DIR": str(data_dir),
        "OPENAI_API_BASE_URL": router_url,
        "OPENAI_API_KEY": "x",                  # the router runs without API keys here
        "ENABLE_OLLAMA_API": "false",
        "WEBUI_AUTH": "false",                  # one automatic admin, no sign-up page
        "WEBUI_SECRET_KEY": secrets.token_hex(32),
        # offline: no Hugging Face downloads, no version check; no embedding model is loaded
        # at start-up (an empty RAG_EMBEDDING_MODEL), since none is on disk to load
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAG_EMBEDDING_MODEL": "",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
        "RAG_RERANKING_MODEL_AUTO_UPDATE": "false",
        "WHISPER_MODEL_AUTO_UPDATE": "false",
        "ENABLE_WEB_SEARCH": "false",
        "ENABLE_VERSION_UPDATE_CHECK": "false",
        "ENABLE_EVALUATION_ARENA_MODELS": "false",
        "ANONYMIZED_TELEMETRY": "false",
        "DO_NOT_TRACK": "true",
        "SCARF_NO_ANALYTICS": "true",
        "GLOBAL_LOG_LEVEL": "INFO",
    })
    if usage_capability:
        env["DEFAULT_MODEL_METADATA"] = json.dumps({"capabilities": {"usage": True}})
    return env


def pick_default(models: list[dict], settings: dict | None, config: dict) -> str | None:
    """The page's rule (resolveDefaultModelIds in src/lib/utils): the first of the user's
    saved models, then of the admin's default models, that is listed and not hidden; else the
    first model listed."""
    available = [m["id"] for m in models
                 if not (((m.get("info") or {}).get("meta") or {}).get("hidden"))]
    prefs = [(settings or {}).get("ui", {}).get("models") or (settings or {}).get("models"),
             (config.get("default_models") or "").split(",") if config.get("default_models") else None]
    for pref in prefs:
        chosen = [m for m in dict.fromkeys(pref or []) if m in available]
        if chosen:
            return chosen[0]
    return available[0] if available else None


def kind_of(row: dict) -> str:
    prompt = (row.get("prompt") or "").lstrip()
    if not prompt.startswith("### Task:"):
        return "chat"
    head = prompt[:200].lower()
    for word, kind in (("title", "title"), ("tags", "tags"), ("follow-up", "follow-ups"),
                       ("useful messages", "follow-ups"), ("follow up", "follow-ups"),
                       ("search quer", "queries"), ("autocomplete", "autocomplete")):
        if word in head:
            return kind
    return "task"


def router_rows(db: Path) -> list[dict]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in con.execute(
            "SELECT id, time, request_id, endpoint, model, profile, decision, backend, status, "
            "error, stream, side, prompt, prompt_tokens, completion_tokens, latency_ms "
            "FROM decisions ORDER BY id")]
    finally:
        con.close()
    for r in rows:
        r["kind"] = kind_of(r)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--router-port", type=int, default=0, help="0: a free port")
    ap.add_argument("--webui-port", type=int, default=0, help="0: a free port")
    ap.add_argument("--fake", action="store_true",
                    help="fake backends instead of the embedded reference pair (fast)")
    ap.add_argument("--max-tokens", type=int, default=64,
                    help="the chat's max_tokens (0: none, Open WebUI's default)")
    ap.add_argument("--usage-capability", action="store_true",
                    help="turn on Open WebUI's 'usage' model capability for every model")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for the whole run")
    args = ap.parse_args()

    owui = WEBUI_VENV / "bin" / "open-webui"
    if not owui.exists():
        print(f"openwebui-check: {owui} missing: run scripts/openwebui-env first", file=sys.stderr)
        return 2
    archroute = Path(sys.executable).parent / "archroute"
    if not archroute.exists():
        print(f"openwebui-check: {archroute} missing: run with the project's .venv python",
              file=sys.stderr)
        return 2

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # so that `finally` stops both servers

    signal.signal(signal.SIGTERM, terminate)
    t_start = time.monotonic()
    deadline = t_start + args.timeout
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    (RUN_DIR / "data").mkdir(parents=True)
    db = RUN_DIR / "decisions.sqlite"
    rport = args.router_port or free_port()
    wport = args.webui_port or free_port()
    router_url = f"http://127.0.0.1:{rport}/v1"
    webui = f"http://127.0.0.1:{wport}"
    timings: dict[str, float] = {}
    results: list[tuple[str, bool, str]] = []
    router = web = None
    rlog, wlog = RUN_DIR / "router.log", RUN_DIR / "webui.log"

    cmd = [str(archroute), "serve", "--port", str(rport), "--decision-log", str(db),
           "--log-prompts"]
    if args.fake:
        cmd += ["--transformer", "fake:fake-transformer", "--hybrid", "fake:fake-hybrid"]
    try:
        with open(rlog, "wb") as rl, open(wlog, "wb") as wl:
            router = subprocess.Popen(cmd, cwd=ROOT, stdout=rl, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
            web = subprocess.Popen([str(owui), "serve", "--host", "127.0.0.1", "--port", str(wport)],
                                   cwd=RUN_DIR, env=webui_env(router_url, RUN_DIR / "data",
                                                              args.usage_capability),
                                   stdout=wl, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        wait_for("archroute serve", lambda: http("GET", f"{router_url}/models", timeout=5)[0] == 200,
                 120, router, rlog)
        timings["router start"] = time.monotonic() - t_start
        wait_for("open-webui serve", lambda: http("GET", f"{webui}/health", timeout=5)[0] == 200,
                 300, web, wlog)
        timings["Open WebUI start"] = time.monotonic() - t_start

        summary = run_chat(webui, db, args, deadline, timings, results)
    except CheckError as exc:
        print(f"openwebui-check: could not run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"openwebui-check: interrupted ({exc or 'Ctrl-C'}); servers stopped", file=sys.stderr)
        return 130
    finally:
        stop(web)
        stop(router)
    timings["total"] = time.monotonic() - t_start

    rows = router_rows(db)
    print_summary(summary, rows, timings, results, args)
    return 0 if results and all(ok for _, ok, _ in results) else 1


def run_chat(webui: str, db: Path, args: argparse.Namespace, deadline: float,
             timings: dict[str, float], results: list[tuple[str, bool, str]]) -> dict:
    out: dict[str, Any] = {"webui_status": []}

    def call(method: str, path: str, body: Any = None) -> Any:
        status, data = http(method, webui + path, body, token, timeout=120)
        out["webui_status"].append((method, path.split("?")[0], status))
        if status >= 400:
            raise CheckError(f"Open WebUI {method} {path}: {status} {data!r:.500}")
        return data

    token = None
    signin = call("POST", "/api/v1/auths/signin", {"email": "", "password": ""})
    token = signin["token"]
    config = call("GET", "/api/config")
    out["webui_version"] = config.get("version")
    models = call("GET", "/api/models")["data"]
    settings = call("GET", "/api/v1/users/user/settings")
    ids = [m["id"] for m in models]
    picked = pick_default(models, settings, config)
    out.update(models=ids, picked=picked)
    by_id = {m["id"]: m for m in models}
    caps = (((by_id.get(picked) or {}).get("info") or {}).get("meta") or {}).get("capabilities") or {}
    out["usage_capability"] = bool(caps.get("usage"))

    params: dict[str, Any] = {}
    if args.max_tokens:
        params["max_tokens"] = args.max_tokens
    session = "check-" + uuid.uuid4().hex[:12]  # the page's socket id; events go to the user room
    chat_id = None
    parent = None
    answers: list[str] = []
    seen = 0
    for n, text in enumerate(TURNS):
        t0 = time.monotonic()
        uid, aid = str(uuid.uuid4()), str(uuid.uuid4())
        user_message = {"id": uid, "parentId": parent, "childrenIds": [aid], "role": "user",
                        "content": text, "timestamp": int(time.time()), "models": [picked]}
        tasks = {"follow_up_generation": True}
        if chat_id is None:  # the page asks for a title and tags on a new chat's first turn
            tasks = {"title_generation": True, "tags_generation": True, **tasks}
        body = {"stream": True, "model": picked, "params": params, "features": {},
                "variables": {}, "model_item": by_id[picked], "session_id": session,
                **({"chat_id": chat_id} if chat_id else {}), "id": aid, "parent_id": parent,
                "user_message": user_message, "background_tasks": tasks}
        res = call("POST", "/api/chat/completions", body)
        chat_id = chat_id or res["chat_id"]
        answers.append(aid)
        # done: the answer is stored, and the router has logged the chat request and every
        # background task of this turn, and Open WebUI has stored the follow-ups (the last)
        want = 1 + len(tasks)

        def finished(aid: str = aid, want: int = want, seen: int = seen,
                     chat_id: str = chat_id) -> bool:
            rows = router_rows(db)[seen:]
            msg = call("GET", f"/api/v1/chats/{chat_id}")["chat"]["history"]["messages"].get(aid, {})
            if msg.get("error"):  # Open WebUI runs no background task after a failed answer
                return True
            return bool(msg.get("done") and len(rows) >= want)

        def followups_stored(aid: str = aid, chat_id: str = chat_id) -> bool:
            chat = call("GET", f"/api/v1/chats/{chat_id}")["chat"]
            return "followUps" in chat["history"]["messages"].get(aid, {})

        wait_for(f"turn {n + 1}", finished, max(10.0, deadline - time.monotonic()), every=1.0)
        try:  # Open WebUI stores the follow-ups after their request (none if it failed)
            wait_for(f"turn {n + 1}'s follow-ups", followups_stored, 10.0)
        except CheckError:
            pass
        time.sleep(1.0)  # the title and tags are written just after the follow-ups
        seen = len(router_rows(db))
        timings[f"turn {n + 1} (answer + background tasks)"] = time.monotonic() - t0
        parent = aid

    chat = call("GET", f"/api/v1/chats/{chat_id}")
    out["chat"] = chat
    msgs = chat["chat"]["history"]["messages"]
    out["answers"] = [msgs.get(a, {}) for a in answers]
    out["tasks"] = call("GET", f"/api/tasks/chat/{chat_id}") if chat_id else None

    # --- the bar ---
    rows = router_rows(db)
    chat_rows = [r for r in rows if r["kind"] == "chat"]
    results.append(("default profile `archroute` listed and picked",
                    "archroute" in ids and picked == "archroute"
                    and all(r["model"] == "archroute" for r in rows),
                    f"listed {ids.index('archroute') + 1 if 'archroute' in ids else '-'}"
                    f" of {len(ids)}; picked {picked}; router saw models "
                    f"{sorted({r['model'] for r in rows})}"))
    bad = [r for r in rows if r["status"] >= 400]
    kinds = {r["kind"] for r in rows}
    side_ok = all(r["side"] == (0 if r["kind"] == "chat" else 1) for r in rows)
    results.append(("no 4xx from the router; title/tags/follow-ups are side requests",
                    not bad and {"title", "tags", "follow-ups"} <= kinds and side_ok
                    and len(chat_rows) == len(TURNS)
                    and all(s < 400 for _, _, s in out["webui_status"])
                    and not any(m.get("error") for m in out["answers"]),
                    f"{len(rows)} requests, statuses {sorted({r['status'] for r in rows})}, "
                    f"4xx: {len(bad)}; kinds {sorted(kinds)}; side flags "
                    f"{'as expected' if side_ok else 'WRONG'}"))
    shown = []
    for i, msg in enumerate(out["answers"]):
        stored = (msg.get("usage") or {}).get("archroute_backend")
        logged = chat_rows[i]["backend"] if i < len(chat_rows) else None
        shown.append(stored is not None and stored == logged)
    results.append(("served backend stored with each answer (usage.archroute_backend)",
                    bool(shown) and all(shown),
                    "; ".join(f"answer {i + 1}: stored "
                              f"{(m.get('usage') or {}).get('archroute_backend')!r}"
                              for i, m in enumerate(out["answers"]))
                    + ("" if out["usage_capability"] else
                       " (model capability 'usage' off: Open WebUI did not ask for usage)")))
    return out


def print_summary(s: dict, rows: list[dict], timings: dict[str, float],
                  results: list[tuple[str, bool, str]], args: argparse.Namespace) -> None:
    def version(dist: str, python: Path | None = None) -> str:
        if python is None:
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                return "?"
        got = subprocess.run([str(python), "-c",
                              f"import importlib.metadata as m; print(m.version({dist!r}))"],
                             capture_output=True, text=True)
        return got.stdout.strip() or "?"

    wpy = WEBUI_VENV / "bin" / "python"
    print("== Open WebUI x archroute serve ==")
    print(f"versions: open-webui {s.get('webui_version') or version('open-webui', wpy)} "
          f"(torch {version('torch', wpy)}, in {WEBUI_VENV.name}), archroute "
          f"{version('archroute')} ({'fake backends' if args.fake else 'embedded reference pair'})"
          f", Python {sys.version.split()[0]}")
    print(f"settings: chat max_tokens {args.max_tokens or 'none'}; model capability 'usage' "
          f"{'on' if s.get('usage_capability') else 'off (Open WebUI default)'}")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"models listed by Open WebUI: {', '.join(s.get('models', []))}")
    print(f"model the page picks: {s.get('picked')}")
    print("requests the router received (decision log):")
    print(f"  {'#':>2} {'kind':<10} {'status':>6} {'side':>4} {'stream':>6} {'model':<10} "
          f"{'backend':<22} {'tokens in/out':>13} {'ms':>7}  error")
    for r in rows:
        print(f"  {r['id']:>2} {r['kind']:<10} {r['status']:>6} {r['side']:>4} {r['stream']:>6} "
              f"{r['model']:<10} {r['backend'] or '-':<22} "
              f"{r['prompt_tokens'] or 0:>6}/{r['completion_tokens'] or 0:<6} "
              f"{r['latency_ms'] or 0:>7.0f}  {r['error'] or ''}")
    counts: dict[tuple[str, int], int] = {}
    for r in rows:
        counts[(r["kind"], r["status"])] = counts.get((r["kind"], r["status"]), 0) + 1
    print("  by kind and status: " + ", ".join(f"{k} {st}: {n}" for (k, st), n in sorted(counts.items())))
    chat = (s.get("chat") or {}).get("chat") or {}
    print(f"stored chat: title {chat.get('title')!r}, tags {chat.get('tags')}")
    for i, m in enumerate(s.get("answers", [])):
        usage = m.get("usage") or {}
        print(f"  answer {i + 1}: backend {usage.get('archroute_backend')!r}, usage "
              f"{json.dumps(usage) if usage else None}, follow-ups {m.get('followUps')}, "
              f"error {m.get('error')}, text {m.get('content', '')[:60]!r}")
    wlog = RUN_DIR / "webui.log"
    failed = [line.split("request failed: ", 1)[-1] for line in
              (wlog.read_text(errors="replace").splitlines() if wlog.exists() else [])
              if "Upstream openai-compatible request failed" in line]
    print(f"Open WebUI's log: {len(failed)} failed upstream requests"
          + "".join(f"\n  {line[:300]}" for line in failed[:5]))
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print(f"logs and data: {RUN_DIR.relative_to(ROOT)}/")


if __name__ == "__main__":
    sys.exit(main())
