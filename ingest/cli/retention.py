"""Command-line side of retention and key rotation: `sweep --once`, `keys rotate [--generate]`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ingest.cli.context import CliError, load_settings, with_db

# Data keys re-wrapped per transaction by `keys rotate`.
ROTATE_BATCH = 1000
# Rows another transaction holds are skipped by a batch and taken by a later one; give up after this.
ROTATE_RETRIES = 50
# `keys rotate --generate` waits this long (seconds) for the running workers to load the new key
# file (they look every ingest.worker.nodes.KEY_FILE_CHECK seconds and report at once).
GENERATE_WAIT = 20.0


def cmd_sweep(args: argparse.Namespace) -> int:
    """One sweep now, unless another process (a running `serve`) is sweeping at this moment."""
    from ingest.worker.sweeper import key_maker, rules_from, utcnow
    from storage.sweeper import sweep

    settings = load_settings()

    async def work(conn, resolved):
        return await sweep(conn, resolved.ks, utcnow(), rules_from(settings), new_key=key_maker(resolved.ring))

    result = with_db(settings, work)
    if not result.swept:
        print("sweep skipped: another process holds the sweeper lease and is sweeping now")
        return 0
    for table in sorted(result.rows_deleted):
        dropped = result.partitions_dropped.get(table)  # None: not a partitioned table (records)
        print(f"{table}: {result.rows_deleted[table]} row(s) deleted" + ("" if dropped is None else f", {dropped} partition(s) dropped"))
    print(f"audit log rows past retention deleted: {result.audit_rows_deleted}")
    print(f"installations erased: {result.installations_erased}")
    print(f"data keys added: {result.data_keys_added}")
    print(f"partitions created: {result.partitions_created}")
    print(f"partitions indexed: {result.partitions_indexed}")
    print(f"swept in {result.seconds:.3f} s")
    if result.deferred:
        print(f"left for the next sweep (a lock was held too long): {', '.join(result.deferred)}")
        return 1
    return 0


def _describe(nodes) -> str:
    return "; ".join(f"{n.node_id} holds {', '.join(n.kek_ids)}" for n in nodes)


async def nodes_lacking(ks, primary_id: str) -> list:
    """Live workers (storage.keystore.live_nodes) that do not hold the key primary_id."""
    from storage.keystore import live_nodes

    return [n for n in await live_nodes(ks) if primary_id not in n.kek_ids]


async def wait_for_nodes(ks, primary_id: str, timeout: float) -> list:
    """Wait up to timeout for every live worker to hold primary_id; returns those that still do not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        lacking = await nodes_lacking(ks, primary_id)
        if not lacking or loop.time() >= deadline:
            return lacking
        await asyncio.sleep(0.5)


async def rotate(conn, ks, ring, *, batch: int) -> int:
    """Re-wrap every data key of the key store `ks` not wrapped by the ring's primary KEK; returns
    how many. Each batch is audited in the data database `conn`."""
    from crypto.datakeys import rewrap, rewrap_hash_key
    from storage.audit import record
    from storage.keystore import count_not_wrapped_by, kek_ids, rewrap_batch, rewrap_hash_keys

    missing = ring.missing(list(await kek_ids(ks)))
    if missing:
        raise CliError(f"TELEMETRY_MASTER_KEY: data keys are wrapped by key id(s) {', '.join(missing)}, "
                       "which are not configured; add them (after the new primary) and run again")
    lacking = await nodes_lacking(ks, ring.primary_id)
    if lacking:
        # Re-wrapped under a key a running worker lacks, a data key it has not cached would be
        # unreadable to it (503 "key material unavailable"): refuse until every one has the key.
        raise CliError(f"keys rotate: {len(lacking)} running worker(s) do not hold the new primary key {ring.primary_id}: "
                       f"{_describe(lacking)}. Restart them with it (TELEMETRY_MASTER_KEY, the new key first; in embedded "
                       "mode they load the key file by themselves within seconds) and run `keys rotate` again")
    # The keys of keyed hashes (one per policy category) first: few, one transaction.
    total = await rewrap_hash_keys(ks, ring.primary_id, lambda *row: rewrap_hash_key(ring, *row))
    if total:
        await record(conn, "cli", "key.rotate", detail={"kek_id": ring.primary_id, "rewrapped": total})
    retries = 0
    while True:
        n = await rewrap_batch(ks, ring.primary_id, lambda *row: rewrap(ring, *row), limit=batch)
        total += n
        if n:
            await record(conn, "cli", "key.rotate", detail={"kek_id": ring.primary_id, "rewrapped": n})
            print(f"re-wrapped {total} data key(s)", file=sys.stderr)
            continue
        if not await count_not_wrapped_by(ks, ring.primary_id):
            return total
        retries += 1
        if retries > ROTATE_RETRIES:
            raise CliError("some data keys stayed locked by other transactions; run `keys rotate` again")
        await asyncio.sleep(0.1)


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """Re-wrap every data key under the primary KEK (with --generate, first add a new primary to the key file)."""
    from crypto.keyring import KeyRing, prepend_key_to_file

    settings = load_settings()
    if args.generate and (settings.dsn is not None or settings.master_key is not None):
        raise CliError("keys rotate --generate: only in embedded mode (keys in <TELEMETRY_DATA_DIR>/master.key). "
                       "With TELEMETRY_MASTER_KEY: put a new key (`keys generate`) first in it, restart the service "
                       "with it, then run `keys rotate`")

    async def work(conn, resolved):
        ring = resolved.ring
        if args.generate:
            key_file = resolved.settings.data_dir / "master.key"
            new_id = prepend_key_to_file(key_file)
            ring = KeyRing.from_setting(key_file.read_text())
            print(f"added key {new_id} to {key_file} as the primary key", file=sys.stderr)
            # A running `serve` loads the key file by itself (ingest.worker.nodes): wait until every live
            # worker says it holds the new key; rotate() refuses if one still does not.
            lacking = await wait_for_nodes(resolved.ks, new_id, args.wait)
            if lacking:
                print(f"waited {args.wait:g} s for the running workers to load the new key", file=sys.stderr)
        total = await rotate(conn, resolved.ks, ring, batch=args.batch)
        from storage.keystore import live_nodes

        return ring, total, [n for n in await live_nodes(resolved.ks) if n.primary != ring.primary_id]

    ring, total, old_primary = with_db(settings, work)
    others = [k for k in ring.key_ids if k != ring.primary_id]
    print(f"re-wrapped {total} data key(s); every data key is now wrapped by {ring.primary_id}")
    if old_primary:
        # They hold the new key but still wrap the data keys they make under another one.
        print(f"running worker(s) still wrap new data keys under another primary: {_describe(old_primary)}; keep their "
              f"keys until they run with {ring.primary_id} first, then run `keys rotate` again")
    elif others:
        print(f"no data key needs key id(s) {', '.join(others)} any more: they can be removed from the keys")
    return 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def add_commands(sub, keys) -> None:
    """Add `sweep` to the top-level commands and `rotate` to the `keys` commands."""
    sweep = sub.add_parser("sweep", help="delete what is past its retention")
    sweep.add_argument("--once", action="store_true", required=True,
                       help="run one sweep now (serve sweeps every TELEMETRY_SWEEP_INTERVAL seconds by itself)")
    sweep.set_defaults(func=cmd_sweep)

    rotate = keys.add_parser("rotate", help="re-wrap every data key under the primary key-encryption key (the first one)")
    rotate.add_argument("--generate", action="store_true",
                        help="embedded mode: first add a new primary key to <data dir>/master.key")
    rotate.add_argument("--batch", type=_positive, default=ROTATE_BATCH, metavar="N", help="data keys per transaction")
    rotate.add_argument("--wait", type=float, default=GENERATE_WAIT, metavar="SECONDS",
                        help="with --generate: how long to wait for running workers to load the new key")
    rotate.set_defaults(func=cmd_keys_rotate)
