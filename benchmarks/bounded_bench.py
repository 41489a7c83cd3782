"""bounded work: what one hostile body costs a worker, and what the value budget costs every body.

- ``value_bomb``: ``telemetry-ingest serve --workers 1``; a 1.3 KiB zstd scan inflating to
  14 MiB of ``{"x":[{},{},...]}`` (5 million empty objects) is sent ROUNDS times; per round
  the worker's CPU seconds (user + system, from psutil) and the latency of heartbeats sent to
  the same worker meanwhile (one every 2 ms while the bomb is in flight). Targets (issue 12):
  the bomb answered 413 for under 0.5 s of CPU, heartbeats within 100 ms.
- ``value_budget``: counting values and depth (``ingest.http.budget.check_budget``) of a 16 MiB
  scan document on one core, against ``orjson.loads`` of the same bytes (ratio: the share of a
  parse the count adds).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from .ceilings import rate_of
from .core import Context, Result, benchmark
from .e2e import add_agents, enroll, service
from .payloads import heartbeat_body, json_headers, scan_document_of_size

ROUNDS = 5
BOMB_OBJECTS = 5_000_000


def value_bomb_body() -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=19).compress(b'{"x":[' + b",".join([b"{}"] * BOMB_OBJECTS) + b"]}")


def _worker_cpu(pid: int) -> tuple[int, float]:
    import psutil

    [worker] = psutil.Process(pid).children()
    t = worker.cpu_times()
    return worker.pid, t.user + t.system


@benchmark("value_bomb")
async def value_bomb(ctx: Context) -> list[Result]:
    """A 1.3 KiB zstd body of 5 million JSON values against one serve worker: its CPU, and heartbeats meanwhile."""
    bomb = value_bomb_body()
    async with service(ctx, 1) as server:
        [inst] = await enroll(ctx, server, 1)
        [agent_token] = await add_agents(server, [inst])
        hb = heartbeat_body(inst.install_id)
        cpu: list[float] = []
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        async with aiohttp.ClientSession() as http:
            async def heartbeat() -> float:
                started = time.perf_counter()
                async with http.post(server.url + "/v1/heartbeats", data=hb, headers=json_headers(inst.token)) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"heartbeat answered {r.status}")
                return time.perf_counter() - started

            await heartbeat()  # warm
            for _ in range(ROUNDS):
                pid, before = _worker_cpu(server.pid)
                async def send_bomb() -> int:
                    async with http.post(server.url + "/v1/scans", data=bomb, headers=json_headers(agent_token, encoding="zstd")) as r:
                        await r.read()
                        return r.status

                sent = asyncio.create_task(send_bomb())
                while not sent.done():
                    latencies.append(await heartbeat())
                    await asyncio.sleep(0.002)
                status = await sent
                statuses[status] = statuses.get(status, 0) + 1
                latencies.append(await heartbeat())
                await asyncio.sleep(0.2)  # let the worker settle before reading its CPU
                _, after = _worker_cpu(server.pid)
                cpu.append(after - before)
    if set(statuses) != {413}:
        raise RuntimeError(f"the bomb was answered {statuses}, not 413")
    details = {"bomb_bytes": len(bomb), "decoded_bytes": 6 + 3 * BOMB_OBJECTS - 1 + 2, "rounds": ROUNDS,
               "statuses": statuses, "heartbeats": len(latencies),
               "note": "worker CPU per bomb (includes the heartbeats meanwhile); target < 0.5 s"}
    return [
        Result("value_bomb.cpu_s", max(cpu), "s", details=details),
        Result("value_bomb.heartbeat_ms", max(latencies) * 1000, "ms",
               details={"note": "slowest heartbeat to the same worker while a bomb was in flight; target < 100 ms",
                        "heartbeats": len(latencies)}),
    ]


@benchmark("value_budget")
async def value_budget(ctx: Context) -> list[Result]:
    """Counting the values and depth of a 16 MiB scan, against parsing it (one core)."""
    from ingest.http.budget import check_budget

    raw = orjson.dumps(scan_document_of_size(16 << 20))
    parses, parse_s = rate_of(lambda: orjson.loads(raw), ctx.micro_duration, 1)
    counts, count_s = rate_of(lambda: check_budget(raw, 1 << 31, 32), ctx.micro_duration, 1)
    details = {"document_bytes": len(raw), "cores": 1}
    return [
        Result("value_budget.parse16m.bytes", parses * len(raw) / parse_s / 1e6, "MB/s", details=details),
        Result("value_budget.count16m.bytes", counts * len(raw) / count_s / 1e6, "MB/s", "value_budget.parse16m.bytes",
               details={**details, "note": "ratio > 1: counting is that many times faster than parsing"}),
    ]
