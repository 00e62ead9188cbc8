"""The chat page (``GET /ui``) in a real browser: Playwright drives Debian's ``chromium``
against a real router process (``archroute serve`` on two fake backends).

Needs ``playwright`` (the ``dev`` extra) and a ``chromium`` on PATH (``./dev setup`` installs
it with apt-get where it may); without them the browser tests skip. No browser is downloaded.
Screenshots go to ``$ARCHROUTE_TEST_ARTIFACTS`` (default ``runs/test-artifacts/ui/``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.router.servers import ROOT, Server

T_REPLY = "Hello from the fake transformer"
H_REPLY = "Hello from the fake hybrid"
KEY = "ui-test-key"
TIMEOUT_MS = 20_000

ARTIFACTS = Path(os.environ.get("ARCHROUTE_TEST_ARTIFACTS")
                 or ROOT / "runs" / "test-artifacts" / "ui")


# text elements whose colour contrast with their background is under WCAG AA (4.5:1)
LOW_CONTRAST_JS = """() => {
  const parse = (c) => { const m = c.match(/rgba?\\(([^)]+)\\)/); if (!m) return null;
    const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1}; };
  const lum = ({r, g, b}) => { const f = (v) => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
  const bgOf = (el) => { for (let e = el; e; e = e.parentElement) {
    const c = parse(getComputedStyle(e).backgroundColor); if (c && c.a > 0) return c; }
    return {r: 255, g: 255, b: 255, a: 1}; };
  const bad = [];
  for (const el of document.querySelectorAll('body *')) {
    if (!el.getClientRects().length) continue;
    if (![...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim())) continue;
    const [hi, lo] = [lum(parse(getComputedStyle(el).color)), lum(bgOf(el))].sort((x, y) => y - x);
    const ratio = (hi + 0.05) / (lo + 0.05);
    if (ratio < 4.5) bad.push(el.tagName + '.' + el.className + ' ' + ratio.toFixed(2));
  }
  return bad;
}"""


def router_args(tmp: Path, *extra: str) -> list[str]:
    return ["serve", "--transformer", f"fake:{T_REPLY}", "--hybrid", f"fake:{H_REPLY}",
            "--decision-log", str(tmp / "decisions.sqlite"), *extra]


# --- without a browser: the page itself ---------------------------------------------

def test_ui_page_is_self_contained(fakes) -> None:
    _, client = fakes
    r = client.get("/ui")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-store"
    csp = r.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "script-src 'sha256-" in csp
    html = r.text
    # nothing from elsewhere: no external script, style, font or image, no innerHTML
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html
    assert "innerHTML" not in html and "localStorage" not in html
    assert 'aria-live="polite"' in html and 'type="password"' in html
    for field in ("model", "api-key", "message"):
        assert f'<label for="{field}">' in html
    assert "/ui" not in client.get("/openapi.json").json()["paths"]


def test_ui_needs_no_key(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tests.router.conftest import Fakes

    f = Fakes(tmp_path, api_keys=[KEY])
    with TestClient(f.app) as client:
        assert client.get("/ui").status_code == 200
        assert client.get("/v1/models").status_code == 401


# --- in the browser -------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; ./dev setup does it as root)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe,
                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def router(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ui")
    s = Server(router_args(tmp), log_path=tmp / "router.log")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


class Page:
    """One browser page on the chat UI, recording what it fetched and any page error."""

    def __init__(self, browser: Any, base: str, **context: Any) -> None:
        self.base = base
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     and "401" not in m.text and "404" not in m.text else None)

    # the page's CSP forbids eval: wait_for_function gets functions ("() => ..."), not
    # bare expressions, which Playwright would eval in the page

    def open(self) -> Page:
        self.page.goto(self.base + "/ui")
        return self

    def wait_models(self) -> list[str]:
        self.page.wait_for_function("() => document.querySelectorAll('#model option').length >= 2")
        return self.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")

    def send(self, text: str) -> Any:
        """Type ``text``, press Enter, wait until the answer is finished; the new turn."""
        n = self.page.locator("article.turn.assistant").count()
        self.page.fill("#message", text)
        self.page.press("#message", "Enter")
        turn = self.page.locator("article.turn.assistant").nth(n)
        self.page.wait_for_function(
            "n => { const t = document.querySelectorAll('article.turn.assistant')[n];"
            " return t && t.dataset.state !== 'streaming'; }", arg=n)
        return turn

    def field(self, turn: Any, name: str) -> str:
        return turn.locator(f'.card [data-field="{name}"] dd').inner_text()

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.is_file() and path.stat().st_size > 0
        return path

    def close(self) -> None:
        self.context.close()

    def check_clean(self) -> None:
        assert not self.errors, self.errors
        foreign = [u for u in self.requests
                   if not (u.startswith(self.base + "/") or u.startswith("data:"))]
        assert not foreign, f"the page fetched from elsewhere: {foreign}"


@pytest.mark.slow
def test_chat_in_browser(browser, router: Server) -> None:
    cards = httpx.get(router.url + "/v1/models").json()["data"]
    profiles = [c["id"] for c in cards if c.get("kind") == "profile"]
    ids = [c["id"] for c in cards]
    default = "archroute" if "archroute" in ids else profiles[0]
    ui = Page(browser, router.url).open()
    try:
        options = ui.wait_models()
        assert set(ids) <= set(options)
        assert ui.page.input_value("#model") == default
        # focus lands on the message box; Shift+Enter is a new line, not a send
        ui.page.wait_for_function("() => document.activeElement.id === 'message'")
        ui.page.keyboard.type("one")
        ui.page.keyboard.press("Shift+Enter")
        ui.page.keyboard.type("two")
        assert ui.page.input_value("#message") == "one\ntwo"
        assert ui.page.locator("article.turn").count() == 0

        # 1. the default profile routes; the card says where and why
        turn = ui.send("Repeat this exactly: the cat sat on the mat.")
        assert turn.get_attribute("data-state") == "done"
        text = turn.locator(".text").inner_text()
        assert text in (T_REPLY, H_REPLY)
        backend, decision = ui.field(turn, "backend"), ui.field(turn, "decision")
        assert decision in ("transformer", "hybrid")
        assert backend == f"fake-{decision}"
        assert text == (T_REPLY if decision == "transformer" else H_REPLY)
        assert ui.field(turn, "profile") != ""
        assert ui.field(turn, "policy") != "direct (no routing)"
        assert re.match(r"\d\.\d{3} \(threshold \d\.\d{3}", ui.field(turn, "score"))
        assert re.search(r"first token \d+ ms · total \d+ ms", ui.field(turn, "latency"))
        assert re.match(r"\d+ prompt \+ \d+ completion = \d+", ui.field(turn, "usage"))
        assert turn.locator('.card [data-field="fallback"]').count() == 0
        if turn.locator('.card [data-field="reasons"]').count():
            assert turn.locator('.card [data-field="reasons"] li').count() >= 1
        ui.shot("chat-routed")

        # 2. a backend picked by name: no routing, that backend answers
        ui.page.select_option("#model", "fake-hybrid")
        turn = ui.send("And now you, hybrid.")
        assert turn.locator(".text").inner_text() == H_REPLY
        assert ui.field(turn, "backend") == "fake-hybrid"
        assert ui.field(turn, "decision") == "hybrid"
        assert ui.field(turn, "policy") == "direct (no routing)"
        assert ui.page.locator("article.turn.assistant .card").count() == 2

        # 3. a model the router does not know: its 404 is shown, in the conversation
        ui.page.evaluate("""() => { const o = document.createElement('option');
            o.value = 'no-such-model'; o.textContent = 'no-such-model';
            document.getElementById('model').append(o); }""")
        ui.page.select_option("#model", "no-such-model")
        turn = ui.send("Who are you?")
        assert turn.get_attribute("data-state") == "error"
        alert = turn.locator('[role="alert"]')
        assert "404" in alert.inner_text() and "no-such-model" in alert.inner_text()
        assert ui.page.locator("#conversation").get_attribute("aria-live") == "polite"
        ui.shot("chat-error")

        # WCAG AA contrast for every text on the page (cards, error, hints); visible focus
        assert ui.page.evaluate(LOW_CONTRAST_JS) == []
        ui.page.focus("#message")
        ui.page.keyboard.press("Tab")
        assert ui.page.evaluate("document.activeElement.id") == "send"
        assert ui.page.eval_on_selector("#send", "e => getComputedStyle(e).outlineStyle") == "solid"

        # model text is text, never markup
        assert ui.page.locator("#conversation script, #conversation img").count() == 0
        ui.check_clean()
    finally:
        ui.close()


@pytest.mark.slow
def test_api_key_in_browser(browser, tmp_path: Path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(KEY + "\n")
    server = Server(router_args(tmp_path, "--api-key-file", str(key_file)),
                    log_path=tmp_path / "router.log").wait_ready()
    ui = Page(browser, server.url)
    try:
        ui.open()
        # the model list needs the key: the 401 is shown and the key field takes the focus
        alert = ui.page.locator('#conversation [role="alert"]').first
        alert.wait_for()
        assert "401" in alert.inner_text()
        ui.page.wait_for_function("() => document.activeElement.id === 'api-key'")
        assert ui.page.get_attribute("#api-key", "type") == "password"

        # a chat without a key: 401 in the conversation
        turn = ui.send("Hello?")
        assert turn.get_attribute("data-state") == "error"
        assert "401" in turn.locator('[role="alert"]').inner_text()
        assert ui.page.evaluate("document.activeElement.id") == "api-key"
        ui.shot("key-missing")

        # with the key: models load, chat works; the key is kept in sessionStorage only
        ui.page.fill("#api-key", KEY)
        ui.page.press("#api-key", "Enter")  # to the message box; the change reloads models
        assert "fake-hybrid" in ui.wait_models()
        ui.page.select_option("#model", "fake-transformer")
        turn = ui.send("Hello with a key")
        assert turn.get_attribute("data-state") == "done"
        assert turn.locator(".text").inner_text() == T_REPLY
        assert ui.field(turn, "backend") == "fake-transformer"
        assert ui.page.evaluate("sessionStorage.getItem('archroute.apiKey')") == KEY
        assert ui.page.evaluate("localStorage.length") == 0
        ui.shot("key-ok")
        # a reload in the same tab keeps the key; the page works without typing it again
        ui.page.reload()
        assert "fake-hybrid" in ui.wait_models()
        assert ui.page.input_value("#api-key") == KEY
        ui.check_clean()
    finally:
        ui.close()
        server.stop()


@pytest.mark.slow
def test_phone_width(browser, router: Server) -> None:
    ui = Page(browser, router.url, viewport={"width": 375, "height": 740},
              is_mobile=True, has_touch=True)
    try:
        ui.open().wait_models()
        ui.page.select_option("#model", "fake-transformer")
        turn = ui.send("unbroken" + "x" * 300)
        assert turn.get_attribute("data-state") == "done"
        assert ui.page.locator(".turn.user .text").inner_text().startswith("unbrokenxxx")
        width = ui.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"horizontal scroll at 375 px: scrollWidth {width}"
        for sel in ("#model", "#api-key", "#message", "#send"):
            box = ui.page.locator(sel).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, sel
        ui.shot("phone-375")
        ui.check_clean()
    finally:
        ui.close()
