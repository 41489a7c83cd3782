"""Per-token rate limiting and slow clients."""

import asyncio

import orjson

from ingest.http.ratelimit import TokenBuckets, retry_after_seconds
from tests.support import heartbeat_body, start_service


def test_token_bucket_refills_at_rate_up_to_burst():
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == 0.5  # one token takes 1/rate seconds
    assert buckets.take("b") == 0.0  # buckets are per key
    now[0] = 0.5
    assert buckets.take("a") == 0.0
    now[0] = 100.0
    assert [buckets.take("a") for _ in range(4)][:3] == [0.0] * 3  # never more than burst
    assert buckets.take("a") > 0
    assert retry_after_seconds(0.01) == "1" and retry_after_seconds(2.2) == "3"


def test_token_buckets_are_bounded():
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=10)
    for i in range(100):
        buckets.take(str(i))
    assert len(buckets._buckets) == 10


async def test_rate_limited_token_gets_429_with_retry_after(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, rate_limit=0.5, rate_burst=2) as svc:
        install_id, token = await svc.enroll()
        _, other = await svc.enroll()
        results = [await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)) for _ in range(4)]
        statuses = [r[0] for r in results]
        assert statuses[:2] == [200, 200] and statuses[2:] == [429, 429]
        assert int(results[2][2]["Retry-After"]) >= 1
        assert results[2][1]["status"] == 429
        assert await db.fetchval("SELECT count(*) FROM heartbeats") == 2
        # another token is not affected
        other_id = await db.fetchval("SELECT install_id FROM tokens WHERE role = 'installation' AND install_id <> $1", install_id)
        assert (await svc.request("POST", "/v1/heartbeats", token=other, json=heartbeat_body(other_id)))[0] == 200


async def test_slow_body_is_cut_off_without_starving_others(db_dsn, master_key, tmp_path, db):
    async with start_service(db_dsn, master_key, tmp_path, read_timeout=0.5) as svc:
        install_id, token = await svc.enroll()
        body = orjson.dumps(heartbeat_body(install_id))

        async def trickle():
            for i in range(len(body)):
                yield body[i : i + 1]
                await asyncio.sleep(0.2)

        slow = asyncio.create_task(svc.request("POST", "/v1/heartbeats", token=token, data=trickle(),
                                               headers={"Content-Type": "application/json"}))
        # meanwhile a normal client is served
        assert (await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat_body(install_id)))[0] == 200
        try:
            status, problem, _ = await slow
            assert status == 408 and problem["status"] == 408
        except Exception as exc:  # the server may close the connection while the client still sends
            assert "Connection" in type(exc).__name__ or "Disconnected" in type(exc).__name__, exc
        assert await db.fetchval("SELECT count(*) FROM heartbeats") == 1
