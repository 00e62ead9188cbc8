"""The chat page: ``GET /ui`` serves ``static/ui.html``, one self-contained file (inline CSS
and JS, no CDN, no build step) that talks to this router's ``/v1`` API from the browser.

The page is public (it holds no secret); its API calls carry the key the user types, kept in
the tab's ``sessionStorage`` only. A Content-Security-Policy pins the inline script and style
by hash and lets the page connect to its own origin only.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("static") / "ui.html"


def _hashes(html: str, tag: str) -> str:
    """CSP source list of the sha256 of each inline ``<tag>...</tag>`` body."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
        for b in bodies) or "'none'"


@cache
def page() -> tuple[str, dict[str, str]]:
    """The page and its response headers, read once."""
    html = PAGE.read_text(encoding="utf-8")
    csp = (f"default-src 'none'; script-src {_hashes(html, 'script')}; "
           f"style-src {_hashes(html, 'style')}; connect-src 'self'; img-src 'self' data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, {"Cache-Control": "no-store", "Content-Security-Policy": csp,
                  "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def install_ui(app: FastAPI) -> None:
    """Add ``GET /ui`` (the chat page) to ``app``; outside ``/v1``, so it needs no API key."""

    @app.get("/ui", include_in_schema=False, response_class=HTMLResponse)
    async def ui() -> HTMLResponse:
        html, headers = page()
        return HTMLResponse(html, headers=headers)
