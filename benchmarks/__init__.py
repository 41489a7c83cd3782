"""Benchmarks: the service and the ceilings it runs under, measured side by side.

Run ``python -m benchmarks`` (``--help`` for options). Absolute numbers on a
shared machine drift; the ratio of a figure to its ceiling, both measured in
the same run on the same machine, does not drift much.

Layout:

- ``core``: ``Result``, the ``Context`` every benchmark receives, and the
  registry (``@benchmark(name, needs=...)``).
- ``loadgen``: closed-loop and open-loop HTTP load drivers.
- ``procs``: starting, awaiting and always terminating server subprocesses.
- ``apps``: the bare aiohttp app (http ceiling) and the naive baseline app,
  run as ``python -m benchmarks.apps``.
- ``payloads``: heartbeat and scan bodies.
- ``ceilings``: http_ceiling, db_ceiling, crypto_ceiling, json_ceiling,
  naive_baseline.
- ``e2e``: the service itself (``telemetry-ingest serve``), compared with the
  ceilings.
- ``runner``: selects, runs, prints the table and writes the JSON.
"""
