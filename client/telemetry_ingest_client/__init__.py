"""telemetry-ingest-client: send heartbeats, scans and policy records to a telemetry-ingest service.

    from telemetry_ingest_client import Client
    token = Client(url).enroll(enroll_secret, install_id)     # the installation token, a str
    answer = Client(url, token=token).heartbeat({...})        # the service's answer, a dict

`AsyncClient` has the same methods, awaitable. No third-party dependency.
"""

from telemetry_ingest_client._async import AsyncClient
from telemetry_ingest_client._client import (
    ANSWER_SUFFIX,
    REJECTED_DIR,
    Answer,
    Backoff,
    CertificateError,
    Client,
    ClientError,
    FlushReport,
    Rejected,
    Spooled,
    Unreachable,
    __version__,
    parse_retry_after,
)

__all__ = [
    "ANSWER_SUFFIX", "REJECTED_DIR", "Answer", "AsyncClient", "Backoff", "CertificateError", "Client", "ClientError",
    "FlushReport", "Rejected", "Spooled", "Unreachable", "__version__", "parse_retry_after",
]
