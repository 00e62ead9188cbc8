"""Rows of the decision log as the learning loop reads them: the request as the policy saw
it (:func:`routing_request`; the log must hold prompts, ``log_prompts``)."""

from __future__ import annotations

from classifiers.request import RoutingRequest


def routing_request(row: dict) -> RoutingRequest | None:
    """The request as the policy saw it, from a logged row (None without its prompt)."""
    req = row.get("request")
    if isinstance(req, dict) and req.get("messages"):
        if req.get("kind") == "chat":
            return RoutingRequest.from_messages(req["messages"], req.get("max_tokens"))
        return RoutingRequest.from_prompt(req["messages"][0]["content"], req.get("max_tokens"))
    if row.get("prompt") is not None:  # logged before the request column: text only
        return RoutingRequest.from_prompt(row["prompt"])
    return None
