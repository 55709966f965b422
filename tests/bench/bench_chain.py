"""Benchmark: verifying an environment's audit hash chain of 1,000,000 rows.

In a scratch database on the Dev environment's server (created and dropped here, so the
demo is untouched), holding the contract schema, ``public.audit_logs`` is filled twice:

- **linkage only**: 1,000,000 rows of "another writer" (no ``hash_scheme``; ``hash`` =
  md5(i), ``previous_hash`` = md5(i - 1)), written by one ``INSERT ... SELECT
  generate_series``;
- **recomputation**: 1,000,000 rows as the dashboard's upsert writes them (``new_data``
  with ``hash_scheme`` billing-ops/2 and an invoice line's values as text): the canonical
  JSON (the text ``reconciliation.auditlog`` writes as ``new_data``) and its sha256
  built in SQL, the chain step in Python, the rows inserted in order. The verification must find every hash
  recomputed and the chain intact, which checks the SQL against ``audit.chain``.

For each, the bare SQL that reads the same rows, streamed through a psycopg server-side
cursor in 2,000-row fetches, every row decoded and dropped: every column in ``created_at,
id`` order, and the verification's own ``SELECT`` (``ENVIRONMENT_CHAIN_SQL``: the content
columns only for rows with our ``hash_scheme``), its floor; beside
``audit.selectors.environment_chain_verify`` (what the ``chain_verify`` job and
``verify_audit_chain --env`` run). Medians of RUNS runs after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from audit.chain import HASH_SCHEME, chain_hash
from audit.selectors import ENVIRONMENT_CHAIN_SQL, environment_chain_verify
from billing_ops.environments import Environment, database_settings
from tests.bench.bench_upsert import scratch_url

ROWS = 1_000_000
RUNS = 3
FETCH_ROWS = 2_000
SCRATCH_DB = "billing_ops_bench_chain"
SCRATCH_KEY = "benchchain"
ACTION = "upsert_missing_lines"
TYPES = ("ENERGY", "NETWORK", "CAPACITY", "TAX", "FEE")

READ_SQL = (
    "SELECT id, action, record_id, old_data, new_data, hash, previous_hash, created_at"
    " FROM public.audit_logs ORDER BY created_at, id"
)

OTHER_WRITER_SQL = """
    INSERT INTO public.audit_logs (action, record_id, new_data, hash, previous_hash, created_at)
    SELECT 'other_writer', i::text, jsonb_build_object('n', i::text), md5(i::text),
           CASE WHEN i > 1 THEN md5((i - 1)::text) END,
           timestamptz '2026-01-01 00:00:00+00' + i * interval '1 millisecond'
      FROM generate_series(1, %(rows)s::bigint) AS i
"""


def _json(expr: str) -> str:
    return f"to_json({expr})::text"


_CREATED_AT = _json("""to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')""")
_AMOUNT = _json("((i * 31) %% 50000 / 100.0)::numeric(18, 2)::text")
_DESCRIPTION = _json("'Active energy consumption ' || i")
_INVOICE = _json("'INV-' || lpad((i / 5)::text, 8, '0')")
_LINE_TYPE = _json("(ARRAY[" + ", ".join(f"'{t}'" for t in TYPES) + "])[1 + i %% 5]")
_QUANTITY = _json("(1 + (i * 7919) %% 100000 / 100.0)::numeric(18, 6)::text")
_UNIT = _json("'UNIT-' || lpad(((i / 5) %% 5000)::text, 6, '0')")

# The rows of one upsert run, with the canonical JSON of audit.chain built in SQL (keys
# sorted, to_json escaping like json.dumps), the text reconciliation.auditlog writes as new_data.
OURS_SOURCE_SQL = f"""
    CREATE UNLOGGED TABLE bench_source AS
    SELECT i, record_id, created_at, new_json,
           encode(sha256(convert_to(
               '{{"action":"{ACTION}","created_at":' || {_CREATED_AT}
               || ',"new_data":' || new_json || ',"old_data":null,"record_id":' || {_json("record_id")}
               || '}}', 'UTF8')), 'hex') AS content
      FROM (
        SELECT i, gen_random_uuid()::text AS record_id,
               timestamptz '2026-02-01 00:00:00+00' + i * interval '1 microsecond' AS created_at,
               '{{"amount":' || {_AMOUNT} || ',"description":' || {_DESCRIPTION}
               || ',"hash_scheme":"{HASH_SCHEME}","invoice_id":' || {_INVOICE}
               || ',"line_type":' || {_LINE_TYPE} || ',"operation":"insert","quantity":' || {_QUANTITY}
               || ',"run_id":"bench-chain","unit_id":' || {_UNIT} || '}}' AS new_json
          FROM generate_series(1, %(rows)s::bigint) AS i
      ) AS g
"""


def fill_other_writer(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE public.audit_logs RESTART IDENTITY")
        conn.execute(OTHER_WRITER_SQL, {"rows": ROWS})
        conn.execute("VACUUM ANALYZE public.audit_logs")


def fill_ours(url: str) -> None:
    """Rows as the dashboard writes them: content hashes in SQL, the chain here, in order."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE public.audit_logs RESTART IDENTITY")
        conn.execute("DROP TABLE IF EXISTS bench_source, bench_chain")
        conn.execute(OURS_SOURCE_SQL, {"rows": ROWS})
        conn.execute("CREATE UNLOGGED TABLE bench_chain (i bigint, hash text, previous_hash text)")
    with psycopg.connect(url) as reader, psycopg.connect(url) as writer:
        previous: str | None = None
        with (
            reader.cursor(name="contents") as contents,
            writer.cursor().copy("COPY bench_chain (i, hash, previous_hash) FROM STDIN") as copy,
        ):
            contents.itersize = 50_000
            contents.execute("SELECT i, content FROM bench_source ORDER BY i")
            for i, content in contents:
                digest = chain_hash(previous, content)
                copy.write_row((i, digest, previous))
                previous = digest
        writer.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"""
            INSERT INTO public.audit_logs
                   (action, record_id, old_data, new_data, hash, previous_hash, created_at)
            SELECT '{ACTION}', s.record_id, NULL, s.new_json::jsonb, c.hash, c.previous_hash, s.created_at
              FROM bench_source s JOIN bench_chain c USING (i) ORDER BY s.i
            """
        )
        conn.execute("DROP TABLE bench_source, bench_chain")
        conn.execute("VACUUM ANALYZE public.audit_logs")


def bare_read(url: str, query: str, params: list[str] | None = None) -> float:
    """One SELECT, streamed through a server-side cursor; every row decoded, then dropped."""
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        with conn.cursor(name="bare") as cur:
            cur.itersize = FETCH_ROWS
            cur.execute(query, params)
            rows = sum(1 for _ in cur)
        elapsed = time.perf_counter() - started
    if rows != ROWS:
        raise RuntimeError(f"read {rows} rows, expected {ROWS}")
    return elapsed


def scratch_environment(url: str) -> Environment:
    """The scratch database (``url``: a libpq conninfo) as an environment, connected like
    every other one (timeouts, application_name)."""
    from django.conf import settings
    from django.db import connections

    conninfo = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(url).items() if v is not None}
    env = Environment(key=SCRATCH_KEY, label="Bench", url=url, conninfo=conninfo)
    raw = {
        env.alias: database_settings(
            conninfo,
            application_name=f"billing-ops bench env={SCRATCH_KEY}",
            connect_timeout_s=settings.CONNECT_TIMEOUT_S,
            statement_timeout_ms=settings.STATEMENT_TIMEOUT_MS,
        ),
        "default": connections.settings["default"],
    }
    connections.settings[env.alias] = connections.configure_settings(raw)[env.alias]
    return env


def timed_verification(env: Environment, *, expect_recomputed: int) -> Callable[[], float]:
    def run() -> float:
        started = time.perf_counter()
        report = environment_chain_verify(env=env)
        elapsed = time.perf_counter() - started
        if not report.intact or report.entries != ROWS or report.recomputed != expect_recomputed:
            raise RuntimeError(f"unexpected verification: {report.entries} rows, {report.damages[:3]}")
        return elapsed

    return run


def median_of(fn: Callable[[], float]) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(RUNS))


def main() -> None:
    from django.db import connections

    from billing_ops.environments import environment_connect, get_environment

    dev = get_environment("dev")
    with environment_connect(dev) as conn:
        base_url = conn.info.dsn + (f" password={conn.info.password}" if conn.info.password else "")
        server = conn.info.server_version
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(SCRATCH_DB)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SCRATCH_DB)))
    url = scratch_url(base_url, SCRATCH_DB)
    env = scratch_environment(url)
    try:
        schema = (
            Path(__file__).resolve().parents[2] / "billing_ops" / "sql" / "contract_schema.sql"
        ).read_text()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(schema)
        print(
            f"\nAudit chain verification (PostgreSQL {server // 10000}, {ROWS:,} audit_logs rows, "
            f"median of {RUNS} after a warm-up)"
        )
        for name, fill, recomputed in (
            ("linkage only (another writer's rows)", fill_other_writer, 0),
            ("recomputation (rows with our hash_scheme)", fill_ours, ROWS),
        ):
            started = time.perf_counter()
            fill(url)
            filled_s = time.perf_counter() - started
            every_column = median_of(lambda: bare_read(url, READ_SQL))
            bare = median_of(lambda: bare_read(url, ENVIRONMENT_CHAIN_SQL, [HASH_SCHEME]))
            verify = median_of(timed_verification(env, expect_recomputed=recomputed))
            print(f"  {name} (rows written in {filled_s:.1f} s):")
            for label, seconds in (
                ("bare SELECT of every column      ", every_column),
                ("bare SELECT of the verification  ", bare),
                ("environment_chain_verify         ", verify),
            ):
                print(
                    f"    {label}{seconds * 1000:9,.0f} ms {ROWS / seconds:11,.0f} rows/s"
                    f"  ({seconds / bare:.1f}x the verification's SELECT)"
                )
    finally:
        connections[env.alias].close()
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(SCRATCH_DB))
            )
