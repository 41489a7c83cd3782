"""The routes, one module per area; each has `setup(app)`. `json_response` is their shared answer,
`refuse_unless_written` their shared reading of a group-commit writer's refusals."""

from __future__ import annotations

import orjson
from aiohttp import web

from ingest.errors import RestrictedProblem, Unauthorized
from storage.installations import GONE, RESTRICTED, REVOKED


def json_response(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def refuse_unless_written(outcome: str) -> None:
    """The problem for a record its batch refused (nothing stored): the installation's processing
    restricted (403), the installation gone or its token revoked (401). Any other outcome passes."""
    if outcome == RESTRICTED:
        raise RestrictedProblem("processing of this installation is restricted; nothing was stored")
    if outcome == GONE:
        raise Unauthorized("this installation no longer exists")
    if outcome == REVOKED:
        raise Unauthorized("this token was revoked; nothing was stored")
