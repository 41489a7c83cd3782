"""HTTP-facing errors. Each maps to one RFC 9457 problem document in ingest.http.middleware (error_response)."""

from __future__ import annotations


class Problem(Exception):
    """An error answered to the client as application/problem+json."""

    status = 500
    slug = "internal"
    title = "Internal error"
    reason: str | None = None  # label of telemetry_rejected_total, if this is a rejection
    extra: dict | None = None  # extension members of the problem document (RFC 9457 section 3.2)

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}


class BadRequest(Problem):
    status, slug, title, reason = 400, "bad-request", "Body is not a valid JSON object", "validation"


class Unauthorized(Problem):
    status, slug, title, reason = 401, "unauthorized", "Missing, unknown or revoked token", "auth"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="telemetry-ingest"'})


class Forbidden(Problem):
    status, slug, title, reason = 403, "forbidden", "Not allowed with this token", "forbidden"


class RestrictedProblem(Problem):
    status, slug, title, reason = 403, "restricted", "Processing of this installation is restricted", "restricted"


class NotFoundProblem(Problem):
    status, slug, title = 404, "not-found", "Unknown resource"


class MethodNotAllowed(Problem):
    status, slug, title = 405, "method-not-allowed", "Method not allowed"


class RequestTimeout(Problem):
    status, slug, title, reason = 408, "request-timeout", "The request was not received in time", "slow_client"


class Conflict(Problem):
    status, slug, title, reason = 409, "conflict", "Conflict", "conflict"


class TooLarge(Problem):
    status, slug, title, reason = 413, "too-large", "Body over the limit", "size"


class UnsupportedMedia(Problem):
    status, slug, title, reason = 415, "unsupported-media-type", "Unsupported Content-Type or Content-Encoding", "encoding"


class Invalid(Problem):
    status, slug, title, reason = 422, "invalid", "A field has the wrong type, range or format, or is missing", "validation"


class RateLimited(Problem):
    status, slug, title, reason = 429, "rate-limited", "Too many requests for this token", "rate_limit"


class AddressRateLimited(RateLimited):
    title = "Too many requests from this address range"


class QuotaExceeded(Problem):
    """An installation is at one of its quotas; the problem document names it (member `quota`)."""

    status, slug, title, reason = 429, "quota-exceeded", "An installation quota is reached", "quota"

    def __init__(self, quota: str, limit: int, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})
        self.extra = {"quota": quota, "limit": limit}


class Unavailable(Problem):
    status, slug, title, reason = 503, "unavailable", "Service overloaded or database unavailable", "overload"
