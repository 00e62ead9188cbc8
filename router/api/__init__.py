"""The router's HTTP endpoints, one module per endpoint family, each an ``APIRouter`` that
:func:`install` attaches to the app (as vLLM's entrypoints do); the serving logic they call
lives in the services kept in ``app.state`` (:class:`router.serving.RouterService`,
:class:`router.learning.feedback.FeedbackService`, :class:`router.reload.Reloader`).

- :mod:`router.api.chat`: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/route``
- :mod:`router.api.models`: ``GET /v1/models``, ``/v1/models/{id}``
- :mod:`router.api.feedback`: ``POST /v1/feedback``, ``GET /v1/feedback/{id}``
- :mod:`router.api.admin`: ``POST /admin/reload``
- :mod:`router.api.health`: ``GET /health``, ``/ready``, ``/metrics``
"""

from __future__ import annotations

from fastapi import FastAPI

from router.api import admin, chat, feedback, health, models


def install(app: FastAPI) -> None:
    """Attach every endpoint family to ``app`` (in this order: the OpenAPI document's)."""
    for module in (chat, models, feedback, admin, health):
        app.include_router(module.router)
