"""PostgreSQL: schema, migrations, pool, queries and the sweeper. Knows nothing of HTTP."""
