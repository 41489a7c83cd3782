"""The HTTP edge of telemetry-ingest: routes, auth, validation, batching, metrics."""


def version() -> str:
    """The installed distribution's version (`telemetry-ingest --version`, telemetry_build_info)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("telemetry-ingest")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"
