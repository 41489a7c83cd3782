"""The HTTP edge of telemetry-ingest: routes, auth, validation, batching, metrics."""
