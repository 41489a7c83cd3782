"""The OpenAPI 3.1 document of the API, built from the policy so it cannot drift from validation."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ingest.pipeline.filter import PERSONAL_PATTERN
from policy import Policy, builtin
from policy.categories import AGENT_REGISTRATION, ENROLLMENT, INSTALLATION, SCAN, Field, declares, file_categories

# What a plaintext string of a category not sealed whole may not hold (ingest.pipeline.filter): U+0000, or a
# word shaped like an e-mail address, an IP address or a MAC address.
_NOT_PERSONAL = {"not": {"pattern": "\\x00|" + PERSONAL_PATTERN}}

PROBLEM = {"$ref": "#/components/schemas/Problem"}


def field_schema(f: Field, plaintext: bool | None = None) -> dict[str, Any]:
    """JSON Schema of one declared field (undeclared keys are allowed: they are dropped, not refused).

    Called on a category's root (plaintext unset: taken from it, as the filter does); an object
    inside it that is optional may be null (stored as absent), as any optional field may.
    """
    top = plaintext is None
    if top:
        plaintext = f.storage != "encrypted"
    if f.kind == "object":
        schema: dict[str, Any] = {"type": "object", "properties": {c.name: field_schema(c, plaintext) for c in f.fields}}
        required = [c.name for c in f.fields if c.required]
        if required:
            schema["required"] = required
        return schema if top else _nullable(schema, f)
    if f.kind == "list":
        items = field_schema(f.items, plaintext)
        if f.items.kind == "object" and not f.items.required:
            items = items["anyOf"][0]  # a list's items are never null
        schema = {"type": "array", "items": items}
        if f.max_items is not None:
            schema["maxItems"] = f.max_items
        return _nullable(schema, f)
    schema = {
        "string": lambda: {"type": "string"},
        "integer": lambda: {"type": "integer"},
        "number": lambda: {"type": "number"},
        "boolean": lambda: {"type": "boolean"},
        "uuid": lambda: {"type": "string", "format": "uuid"},
        "time": lambda: {"type": "string", "format": "date-time"},
        "email": lambda: {"type": "string", "format": "email"},
    }[f.kind]()
    if f.max_length is not None:
        schema["maxLength"] = f.max_length
    if f.minimum is not None:
        schema["minimum"] = f.minimum
    if f.maximum is not None:
        schema["maximum"] = f.maximum
    if f.pattern is not None:
        schema["pattern"] = f.pattern
    if f.kind == "string" and plaintext and f.storage == "plaintext":
        schema.update(_NOT_PERSONAL)
    return _nullable(schema, f)


def _nullable(schema: dict[str, Any], f: Field) -> dict[str, Any]:
    if f.required:
        return schema
    return {"anyOf": [schema, {"type": "null"}]}


def _responses(success: dict[str, Any], *failures: int, auth: bool = True) -> dict[str, Any]:
    out = dict(success)
    codes = set(failures) | ({401, 403, 429, 503} if auth else set())
    for code in sorted(codes):
        out[str(code)] = {"description": _REASONS[code], "content": {"application/problem+json": {"schema": PROBLEM}}}
    return out


_REASONS = {
    400: "Body is not valid JSON or not an object", 401: "Missing, unknown or revoked token",
    403: "Token not allowed here, or installation restricted", 404: "Unknown resource", 408: "Body not received in time",
    409: "Conflict", 413: "Body over the limit", 415: "Unsupported Content-Type or Content-Encoding",
    422: "A declared field has the wrong type, range or format, or a required field is missing",
    429: "Rate limit", 503: "Overloaded or database unavailable",
}
_BODY_FAILURES = (400, 408, 413, 415, 422)


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _dropped() -> dict[str, Any]:
    return {"type": "array", "items": {"type": "string"}}


def _settings_schema(policy: Policy) -> dict[str, Any]:
    """PUT /v1/installation/settings: one retention per category the policy lets installations shorten."""
    from ingest.http.routes.scans import settings_body

    body = settings_body(policy)
    schema = field_schema(body)
    if len(body.fields) > 1:
        schema["anyOf"] = [{"required": [f.name]} for f in body.fields]
    return schema


def _record_answer() -> dict[str, Any]:
    return {"type": "object", "required": ["record_id", "expires_at", "dropped_fields"], "properties": {
        "record_id": {"type": "string"}, "expires_at": {"type": "string", "format": "date-time"}, "dropped_fields": _dropped()}}


def build(policy: Policy | None = None) -> dict[str, Any]:
    """The whole document, for the policy in force (default: the built-in one): its paths and bodies."""
    policy = policy or builtin()
    uuid_param = lambda name: {"name": name, "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}  # noqa: E731
    paths: dict[str, Any] = {
        "/v1/enroll": {"post": {
            "summary": "Enroll an installation (enrollment secret)", "security": [{"bearer": []}],
            "requestBody": _body(field_schema(ENROLLMENT)),
            "responses": _responses({"201": _json({"type": "object", "required": ["install_id", "token"], "properties": {
                "install_id": {"type": "string", "format": "uuid"}, "token": {"type": "string"}}}, "Enrolled")}, 409, *_BODY_FAILURES),
        }},
        "/v1/heartbeats": {"post": {
            "summary": "Post a heartbeat (installation token)", "security": [{"bearer": []}],
            "requestBody": _body(field_schema(INSTALLATION.root)),
            "responses": _responses({"200": _json({"type": "object", "required": ["stored", "dropped_fields"], "properties": {
                "stored": {"type": "boolean"}, "dropped_fields": _dropped()}})}, *_BODY_FAILURES),
        }},
        "/v1/installation/settings": {"put": {
            "summary": "Change the installation's settings (installation token)", "security": [{"bearer": []}],
            "requestBody": _body(_settings_schema(policy)),
            "responses": _responses({"200": _json({"type": "object", "properties": {
                f.name: {"type": "integer"} for f in policy.settings_field().fields}})}, *_BODY_FAILURES),
        }},
        "/v1/agents": {"post": {
            "summary": "Create an agent (installation token)", "security": [{"bearer": []}],
            "requestBody": _body(field_schema(AGENT_REGISTRATION)),
            "responses": _responses({"201": _json({"type": "object", "required": ["agent_id", "token"], "properties": {
                "agent_id": {"type": "string", "format": "uuid"}, "token": {"type": "string"}}}, "Created")}, *_BODY_FAILURES),
        }},
        "/v1/agents/{agent_id}": {"delete": {
            "summary": "Revoke an agent (installation token)", "security": [{"bearer": []}],
            "parameters": [uuid_param("agent_id")],
            "responses": _responses({"204": {"description": "Revoked"}}, 404),
        }},
        "/v1/scans": {"post": {
            "summary": "Upload a scan (agent token)", "security": [{"bearer": []}],
            "requestBody": _body(field_schema(SCAN.root)),
            "responses": _responses({
                "201": _json(_scan_answer(), "Stored"), "200": _json(_scan_answer(), "Already stored (same scan_id, same content)"),
            }, 409, *_BODY_FAILURES),
        }},
        "/v1/admin/installations/{install_id}/export": {"get": {
            "summary": "Everything held about an installation (admin token)", "security": [{"bearer": []}],
            "parameters": [uuid_param("install_id")],
            "responses": _responses({"200": _json({"type": "object"})}, 404),
        }},
        "/v1/admin/installations/{install_id}": {"delete": {
            "summary": "Erase an installation (admin token)", "security": [{"bearer": []}],
            "parameters": [uuid_param("install_id")],
            "responses": _responses({"204": {"description": "Erased"}}, 404),
        }},
        "/v1/admin/installations/{install_id}/restriction": {"put": {
            "summary": "Restrict or release processing (admin token)", "security": [{"bearer": []}],
            "parameters": [uuid_param("install_id")],
            "requestBody": _body({"type": "object", "required": ["restricted"], "properties": {"restricted": {"type": "boolean"}}}),
            "responses": _responses({"200": _json({"type": "object"})}, 404, *_BODY_FAILURES),
        }},
        "/v1/admin/stats": {"get": {
            "summary": "Aggregate, anonymous statistics (admin token)", "security": [{"bearer": []}],
            "responses": _responses({"200": _json({"type": "object"})}),
        }},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json({"type": "object"})}}},
        "/readyz": {"get": {"summary": "Readiness (database answers)", "responses": {
            "200": _json({"type": "object"}), "503": _json({"type": "object"}, "Database unavailable")}}},
        "/metrics": {"get": {"summary": "Prometheus text exposition", "responses": {
            "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json({"type": "object"})}}},
    }
    if not declares(policy, INSTALLATION):
        del paths["/v1/heartbeats"]
    if not declares(policy, SCAN):
        del paths["/v1/scans"]
    if policy.agents is None:
        del paths["/v1/agents"], paths["/v1/agents/{agent_id}"]
    for c in file_categories(policy):
        paths[f"/v1/records/{c.name}"] = {"post": {
            "summary": f"Send a {c.record} of category {c.name}: {c.purpose} (installation token)",
            "security": [{"bearer": []}],
            "requestBody": _body(field_schema(c.root)),
            "responses": _responses({
                "201": _json(_record_answer(), "Stored"),
                **({"200": _json(_record_answer(), f"Already stored (same {c.idempotency_key}, same content)")}
                   if c.idempotency_key else {}),
            }, *((409,) if c.idempotency_key else ()), *_BODY_FAILURES),
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "telemetry-ingest", "version": "1", "description": "Secure telemetry ingestion. Undeclared fields are dropped and reported, not refused (unless the operator chose reject mode)."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Problem": {"type": "object", "required": ["type", "title", "status", "detail"], "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"},
                # quota-exceeded (429) only: which installation quota, and its value
                "quota": {"type": "string"}, "limit": {"type": "integer"}}}},
        },
    }


def _scan_answer() -> dict[str, Any]:
    return {"type": "object", "required": ["scan_id", "expires_at", "dropped_fields"], "properties": {
        "scan_id": {"type": "string", "format": "uuid"}, "expires_at": {"type": "string", "format": "date-time"}, "dropped_fields": _dropped()}}


def setup(app: web.Application) -> None:
    """Serve the document at /openapi.json (built once)."""
    import orjson

    from ingest.keys import POLICY

    body = orjson.dumps(build(app[POLICY]))

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
