"""``POST /admin/reload``: a new classifier artifact without a restart
(:mod:`router.reload`; also on SIGHUP). Behind the admin API keys (GuardMiddleware)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request

from router import errors
from router.reload import ReloadRequest

router = APIRouter()


@router.post("/admin/reload", include_in_schema=False)
async def admin_reload(request: Request) -> dict:
    """Load a classifier artifact (``{"artifact": PATH}``; default: the shipped one) and
    swap it in without a restart. A path only from ``artifact_roots``."""
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
        body = ReloadRequest.model_validate(data if data is not None else {})
    except (ValueError, TypeError) as exc:
        raise errors.InvalidRequestError(f"/admin/reload: expected {{\"artifact\": "
                                         f"PATH}} or no body: {exc}") from None
    return await request.app.state.reloader.reload(body.artifact, body.force)
