"""Bytes on disk per heartbeat-history row and per stored scan, measured against a real PostgreSQL.

    python -m benchmarks.capacity            # an embedded PostgreSQL in a temporary directory
    TELEMETRY_TEST_DSN=postgresql://... python -m benchmarks.capacity

Runs the real app in process (tests.support.start_service), sends HEARTBEATS heartbeats and
SCANS scans of a typical size (benchmarks.payloads.scan_document(200): 200 software entries)
through HTTP, then reports the size of the tables with their indexes and TOAST
(pg_total_relation_size, over every partition) divided by the rows. docs/operations.md quotes it.
Not a timed benchmark: sizes only.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import asyncpg
import orjson

from benchmarks.payloads import heartbeat, scan_document

INSTALLATIONS = 50
HEARTBEATS = 20_000
SCANS = 1_000
SOFTWARE_ENTRIES = 200


def _with_database(dsn: str, database: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


async def table_bytes(conn: asyncpg.Connection, table: str) -> int:
    return await conn.fetchval(
        "SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM pg_partition_tree($1::regclass)", table)


async def measure(server_dsn: str) -> None:
    from tests.support import start_service

    name = f"ti_capacity_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = _with_database(server_dsn, name)
    data_dir = Path(tempfile.mkdtemp(prefix="ti-capacity-"))
    try:
        key = base64.b64encode(os.urandom(32)).decode()
        async with start_service(dsn, key, data_dir) as svc:
            secret = svc.create_secret()
            installs = [await svc.enroll(secret=secret) for _ in range(INSTALLATIONS)]
            agents = []
            for install_id, token in installs:
                status, body, _ = await svc.request("POST", "/v1/agents", token=token, json={"name": "agent"})
                assert status == 201, body
                agents.append(body["token"])
            conn = await asyncpg.connect(dsn)
            ks = await asyncpg.connect(_with_database(server_dsn, name + "_keys"))
            base_hb, base_scans, base_keys = (await table_bytes(conn, "heartbeats"), await table_bytes(conn, "scans"),
                                              await ks.fetchval("SELECT pg_total_relation_size('data_keys')"))

            async def send_heartbeats(worker: int) -> None:
                for i in range(worker, HEARTBEATS, 16):
                    install_id, token = installs[i % INSTALLATIONS]
                    status, body, _ = await svc.request("POST", "/v1/heartbeats", token=token, json=heartbeat(str(install_id)))
                    assert status == 200, body

            await asyncio.gather(*(send_heartbeats(w) for w in range(16)))
            plain = []

            async def send_scans(worker: int) -> None:
                for i in range(worker, SCANS, 8):
                    doc = scan_document(SOFTWARE_ENTRIES, seed=i)
                    doc["scan_id"] = str(uuid.uuid4())
                    plain.append(len(orjson.dumps(doc)))
                    status, body, _ = await svc.request("POST", "/v1/scans", token=agents[i % INSTALLATIONS], json=doc)
                    assert status == 201, body

            await asyncio.gather(*(send_scans(w) for w in range(8)))
            for t in ("heartbeats", "scans"):
                await conn.execute(f"VACUUM ANALYZE {t}")
            hb = await table_bytes(conn, "heartbeats") - base_hb
            sc = await table_bytes(conn, "scans") - base_scans
            rows_hb = await conn.fetchval("SELECT count(*) FROM heartbeats")
            rows_sc = await conn.fetchval("SELECT count(*) FROM scans")
            sealed = await conn.fetchval("SELECT avg(length(ciphertext)) FROM scans")
            keys = await ks.fetchval("SELECT count(*) FROM data_keys")
            ks_bytes = await ks.fetchval("SELECT pg_total_relation_size('data_keys')") - base_keys
            await conn.close()
            await ks.close()
        print(f"heartbeat history: {rows_hb} rows, {hb} bytes with indexes: {hb / rows_hb:.0f} bytes per row")
        print(f"scans: {rows_sc} rows of ~{sum(plain) / len(plain) / 1024:.1f} KiB JSON ({SOFTWARE_ENTRIES} software entries), "
              f"sealed {sealed:.0f} bytes each; {sc} bytes with indexes and TOAST: {sc / rows_sc:.0f} bytes per scan")
        print(f"key store: {keys} data keys, {ks_bytes} bytes more with indexes")
    finally:
        for db in (name, name + "_keys"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    given = os.environ.get("TELEMETRY_TEST_DSN")
    if given:
        asyncio.run(measure(given))
        return
    from storage.embedded import EmbeddedPostgres

    base = Path(tempfile.mkdtemp(prefix="ti-capacity-pg-"))
    server = EmbeddedPostgres(base)
    try:
        asyncio.run(measure(server.start()))
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
