"""The Citus distribution SQL covers every table, and every distributed table can be sharded by install_id."""

import re

from tests.support import ROOT

SQL = (ROOT / "deploy" / "citus" / "distribute.sql").read_text()
DISTRIBUTED = set(re.findall(r"create_distributed_table\('(\w+)',\s*'install_id'", SQL))
REFERENCE = set(re.findall(r"create_reference_table\('(\w+)'\)", SQL))


async def test_every_table_is_distributed_or_replicated(db):
    tables = {r["relname"] for r in await db.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition")}
    assert tables - {"schema_migrations"} == DISTRIBUTED | REFERENCE
    assert "installations" in DISTRIBUTED and not DISTRIBUTED & REFERENCE


async def test_distributed_tables_carry_install_id_in_every_unique_key(db):
    for table in DISTRIBUTED:
        cols = {r["attname"] for r in await db.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped", table)}
        assert "install_id" in cols, table
        for idx in await db.fetch(
                "SELECT indexrelid::regclass::text AS name, "
                "array(SELECT a.attname FROM unnest(i.indkey) k JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k) AS cols "
                "FROM pg_index i WHERE i.indrelid = $1::regclass AND i.indisunique", table):
            assert "install_id" in idx["cols"], (table, idx["name"])
