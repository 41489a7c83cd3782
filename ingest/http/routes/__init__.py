"""The routes, one module per area; each has `setup(app)`. `json_response` is their shared answer."""

from __future__ import annotations

import orjson
from aiohttp import web


def json_response(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
