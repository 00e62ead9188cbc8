"""Every body the router's API takes is JSON: read it as JSON whatever content type the
client sent. ``curl -d '{...}'`` sends ``application/x-www-form-urlencoded``; an OpenAI-style
API (and the docs' own examples) should not answer that with "Input should be a valid
dictionary". A body that is not JSON still fails, as JSON: "the body is not valid JSON".
A multipart upload is left alone (no endpoint takes one; it fails validation clearly)."""

from __future__ import annotations

from starlette.types import Scope

JSON = b"application/json"
_READ_AS_JSON = (b"application/x-www-form-urlencoded", b"text/plain", b"")


def json_content_type(scope: Scope) -> None:
    """Rewrite a POST/PUT/PATCH request's content type to JSON when the client sent none,
    a form's, or plain text (in ``scope``, before FastAPI reads the body)."""
    if scope.get("method") not in ("POST", "PUT", "PATCH"):
        return
    sent = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
    if sent[:16] == JSON:  # the common case: nothing to do, nothing copied
        return
    if sent.split(b";")[0].strip().lower() in _READ_AS_JSON:
        scope["headers"] = [*((k, v) for k, v in scope["headers"] if k != b"content-type"),
                            (b"content-type", JSON)]
