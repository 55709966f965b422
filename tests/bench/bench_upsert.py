"""Benchmark: the batch upsert of 1,000,000 CSV lines with its audit chain.

In a scratch database on the Dev environment's server (created and dropped here, so the
demo is untouched), holding the contract schema and 100,000 existing invoice lines:

- a generated CSV of N lines, 10 % of them matching existing lines (half with the same
  values, written with messy whitespace and case; half with new values);
- bare: ``COPY`` of the same file into a plain unindexed table of text columns (logged,
  like the tables the upsert writes), committed;
- full: ``reconciliation.upsert.batch_upsert`` (COPY, normalization, dedup, upsert in
  batches of 50,000, one chained audit row per changed line), in a child process whose
  peak RSS is reported (at 100,000 and 1,000,000 lines: memory must stay flat);
- plain: the file's new lines alone, normalized beforehand, by one plain ``INSERT ... SELECT``
  (the floor of the upsert's main write: no conflict handling, no audit);
- audit alone: the full run's audit rows, saved after it, written again by one ``COPY`` into
  the emptied ``audit_logs`` (the floor of its other write: no hashing, no reading);
- naive: the file parsed in Python and sent in batches of 50,000 rows with
  ``executemany`` of ``INSERT ... ON CONFLICT ... DO UPDATE`` (psycopg 3 pipelines it),
  no audit; and the same batches through Django's own
  ``InvoiceLine.objects.bulk_create(update_conflicts=True)``, no audit.

Each timed run starts from the same 100,000 lines.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

EXISTING = 100_000
SIZES = (100_000, 1_000_000)
BATCH = 50_000
SCRATCH_DB = "billing_ops_bench_upsert"
TYPES = ("ENERGY", "NETWORK", "CAPACITY", "TAX", "FEE")
BASES = (
    "Active energy consumption",
    "Network usage fee",
    "Capacity charge",
    "Excise tax",
    "Meter service fee",
)


def line(n: int) -> tuple[str, str, str, str, str, str]:
    return (
        f"INV-{n // 5:08d}",
        f"UNIT-{(n // 5) % 5000:06d}",
        TYPES[n % 5],
        f"{BASES[n % 5]} Jan 2025",
        f"{1 + (n * 7919) % 100000 / 100:.3f}",
        f"{(n * 31) % 50000 / 100:.2f}",
    )


def write_csv(path: Path, count: int) -> None:
    """Lines 0..EXISTING-1 exist already; every tenth CSV line is one of them."""
    matched = count // 10
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["invoice_id", "unit_id", "line_type", "description", "quantity", "amount"])
        for k in range(count):
            if k % 10 == 0 and k // 10 < matched:
                inv, unit, lt, desc, q, a = line((k // 10) % EXISTING)
                if k % 20 == 0:  # same values, messy spelling: an update of description only
                    desc = "  " + desc.upper().replace(" ", "   ") + " "
                else:  # same spelling, new amount
                    a = f"{float(a) + 1:.2f}"
                w.writerow((inv, unit, lt, desc, q, a))
            else:
                w.writerow(line(EXISTING + k))


def scratch_url(base_url: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(base_url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: v for k, v in info.items() if v is not None})


def reset(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE public.invoice_lines, public.audit_logs RESTART IDENTITY")
        conn.execute(
            r"""
            INSERT INTO public.invoice_lines
                   (invoice_id, unit_id, line_type, description, normalized_description,
                                              quantity, amount)
            SELECT i, u, t, d, regexp_replace(lower(trim(d)), '\s+', ' ', 'g'), q::numeric, a::numeric
              FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
                   AS x(i, u, t, d, q, a)
            """,
            [list(col) for col in zip(*(line(n) for n in range(EXISTING)), strict=True)],
        )
        conn.execute("VACUUM ANALYZE public.invoice_lines")
        conn.execute("CHECKPOINT")


def bare_copy(url: str, path: Path) -> float:
    """COPY into a plain (logged, unindexed) table of text columns, committed: the floor."""
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE bare_copy (invoice_id text, unit_id text, line_type text, description text,"
            " quantity text, amount text)"
        )
        conn.commit()
        try:
            started = time.perf_counter()
            with (
                path.open("rb") as f,
                cur.copy("COPY bare_copy FROM STDIN (FORMAT csv, HEADER true)") as copy,
            ):
                while chunk := f.read(1 << 20):
                    copy.write(chunk)
            conn.commit()
            return time.perf_counter() - started
        finally:
            cur.execute("DROP TABLE bare_copy")
            conn.commit()


def plain_insert(url: str, path: Path) -> float:
    """The floor of the upsert's main write: a plain INSERT ... SELECT of the file's new lines
    into invoice_lines with its three indexes (normalized beforehand, untimed), with the ids
    the upsert gives new lines (``_NEW_ID``; the column's gen_random_uuid() default alone
    costs seconds per million rows here), no conflict handling, no audit."""
    from reconciliation.upsert import _NEW_ID, new_line_ids

    with psycopg.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TEMPORARY TABLE staged (invoice_id text, unit_id text, line_type text, description text,"
            " quantity numeric, amount numeric)"
        )
        with path.open("rb") as f, cur.copy("COPY staged FROM STDIN (FORMAT csv, HEADER true)") as copy:
            while chunk := f.read(1 << 20):
                copy.write(chunk)
        cur.execute(
            r"""
            CREATE TEMPORARY TABLE new_lines AS
            SELECT row_number() OVER () AS record, s.*,
                   regexp_replace(lower(trim(s.description)), '\s+', ' ', 'g') AS nd
              FROM staged s
            """
        )
        cur.execute(
            """
            DELETE FROM new_lines n USING public.invoice_lines l
             WHERE (l.invoice_id, l.unit_id, l.line_type, l.normalized_description)
                 = (n.invoice_id, n.unit_id, n.line_type, n.nd)
            """
        )
        conn.commit()
        started = time.perf_counter()
        cur.execute(
            f"""
            INSERT INTO public.invoice_lines
                   (id, invoice_id, unit_id, line_type, description, normalized_description, quantity, amount)
            SELECT {_NEW_ID}, invoice_id, unit_id, line_type, description, nd, quantity, amount
              FROM new_lines s
            """,
            new_line_ids(),
        )
        conn.commit()
        return time.perf_counter() - started


def save_audit_rows(url: str, path: Path) -> None:
    """The audit rows the full run wrote, as COPY text (untimed)."""
    from reconciliation.auditlog import COPY_COLUMNS

    statement = f"COPY (SELECT {COPY_COLUMNS} FROM public.audit_logs ORDER BY id) TO STDOUT"
    with (
        psycopg.connect(url) as conn,
        conn.cursor() as cur,
        path.open("wb") as f,
        cur.copy(statement) as copy,
    ):
        for block in copy:
            f.write(block)


def audit_copy(url: str, path: Path) -> float:
    """The floor of the upsert's audit write: the same rows by one COPY into the emptied
    audit_logs (its indexes kept), committed."""
    from reconciliation.auditlog import COPY_COLUMNS

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE public.audit_logs")
        conn.execute("CHECKPOINT")
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        with path.open("rb") as f, cur.copy(f"COPY public.audit_logs ({COPY_COLUMNS}) FROM STDIN") as copy:
            while chunk := f.read(1 << 20):
                copy.write(chunk)
        conn.commit()
        return time.perf_counter() - started


def naive(url: str, path: Path) -> float:
    statement = r"""
        INSERT INTO public.invoice_lines AS l
               (invoice_id, unit_id, line_type, description, normalized_description,
                                               quantity, amount)
        VALUES (%s, %s, %s, %s, regexp_replace(lower(trim(%s)), '\s+', ' ', 'g'), %s, %s)
        ON CONFLICT (invoice_id, unit_id, line_type, normalized_description)
        DO UPDATE SET description = excluded.description, quantity = excluded.quantity,
                      amount = excluded.amount
    """
    started = time.perf_counter()
    with psycopg.connect(url) as conn, conn.cursor() as cur, path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        batch: list[tuple[Any, ...]] = []
        for inv, unit, lt, desc, q, a in reader:
            batch.append((inv, unit, lt, desc, desc, q, a))
            if len(batch) == BATCH:
                cur.executemany(statement, batch)
                batch = []
        if batch:
            cur.executemany(statement, batch)
        conn.commit()
    return time.perf_counter() - started


def django_bulk_create(url: str, path: Path) -> float:
    """The same as naive, with Django's own bulk_create(update_conflicts=True) on the mirror model."""
    import re

    from django.db import connections

    from reconciliation.models import InvoiceLine

    alias = "bench_scratch"
    info = psycopg.conninfo.conninfo_to_dict(url)
    connections.databases[alias] = {
        **connections.databases["default"],
        "NAME": info["dbname"],
        "USER": info.get("user", ""),
        "PASSWORD": info.get("password", ""),
        "HOST": info.get("host", ""),
        "PORT": info.get("port", ""),
    }
    spaces = re.compile(r"\s+")
    now = datetime.now(UTC)
    started = time.perf_counter()
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            next(reader)
            batch: list[InvoiceLine] = []
            for inv, unit, lt, desc, q, a in reader:
                batch.append(
                    InvoiceLine(
                        id=uuid.uuid4(),  # the mirror model has no defaults: Django sends every column
                        created_at=now,
                        invoice_id=inv,
                        unit_id=unit,
                        line_type=lt,
                        description=desc,
                        normalized_description=spaces.sub(" ", desc.strip().lower()),
                        quantity=q,
                        amount=a,
                    )
                )
                if len(batch) == BATCH:
                    _bulk(batch, alias)
                    batch = []
            if batch:
                _bulk(batch, alias)
    finally:
        connections[alias].close()
        del connections.databases[alias]
    return time.perf_counter() - started


def _bulk(batch: list[Any], alias: str) -> None:
    from reconciliation.models import InvoiceLine

    InvoiceLine.objects.using(alias).bulk_create(
        batch,
        update_conflicts=True,
        unique_fields=["invoice_id", "unit_id", "line_type", "normalized_description"],
        update_fields=["description", "quantity", "amount"],
    )


def full(url: str, path: Path, run_id: str) -> dict[str, Any]:
    """The product's upsert in a child process: (figures, peak RSS in MB)."""
    child = subprocess.run(
        [sys.executable, "-m", "tests.bench.upsert_child", url, str(path), run_id, str(BATCH)],
        capture_output=True,
        text=True,
        check=False,
        env=os.environ,
    )
    if child.returncode != 0:
        raise RuntimeError(child.stderr[-3000:])
    return json.loads(child.stdout.strip().splitlines()[-1])


@contextmanager
def scratch_database(name: str) -> Iterator[tuple[str, int]]:
    """A database ``name`` with the contract schema on the Dev environment's server, dropped
    afterwards (the demo stays untouched): yields (its URL, the server's version number)."""
    from billing_ops.environments import environment_connect, get_environment

    with environment_connect(get_environment("dev")) as conn:
        base_url = conn.info.dsn + (f" password={conn.info.password}" if conn.info.password else "")
        server = conn.info.server_version
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = scratch_url(base_url, name)
    try:
        schema = (
            Path(__file__).resolve().parents[2] / "billing_ops" / "sql" / "contract_schema.sql"
        ).read_text()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(schema)
        yield url, server
    finally:
        with psycopg.connect(base_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main() -> None:
    with scratch_database(SCRATCH_DB) as (url, server):
        print(
            f"\nBatch upsert (PostgreSQL {server // 10000}, {EXISTING:,} existing lines, "
            f"batches of {BATCH:,})"
        )
        with tempfile.TemporaryDirectory() as tmp:
            for size in SIZES:
                path = Path(tmp) / f"missing_lines_{size}.csv"
                write_csv(path, size)
                mb = path.stat().st_size / 1e6
                reset(url)
                bare = bare_copy(url, path)
                reset(url)
                result = full(url, path, f"bench-{size}")
                figures = result["outcome"]
                saved = Path(tmp) / "audit_rows.copy"
                save_audit_rows(url, saved)
                audit_floor = audit_copy(url, saved)
                saved.unlink()
                reset(url)
                floor = plain_insert(url, path)
                reset(url)
                slow = naive(url, path)
                reset(url)
                slower = django_bulk_create(url, path)
                print(f"  {size:,} lines ({mb:.0f} MB):")
                print(f"    bare COPY into an unindexed table   {bare * 1000:10,.0f} ms")
                print(
                    f"    full upsert with audit chain        {result['seconds'] * 1000:10,.0f} ms"
                    f"  ({result['seconds'] / bare:.1f}x bare)  peak RSS {result['peak_rss_mb']:.0f} MB"
                    f" ({result['ready_rss_mb']:.0f} MB before it started)"
                )
                print(
                    f"      inserted {figures['inserted']:,}, updated {figures['updated']:,}, "
                    f"unchanged {figures['unchanged']:,}, audit rows {figures['audit_rows']:,}; "
                    f"stages: {result['stages']}"
                )
                print(
                    f"    plain INSERT of the new lines only  {floor * 1000:10,.0f} ms"
                    f"  ({floor / bare:.1f}x bare, no conflict handling, no audit)"
                )
                print(
                    f"    COPY of its audit rows alone        {audit_floor * 1000:10,.0f} ms"
                    f"  ({audit_floor / bare:.1f}x bare, into audit_logs with its indexes, no hashing)"
                )
                print(
                    f"    the two writes alone, together      {(floor + audit_floor) * 1000:10,.0f} ms"
                    f"  ({(floor + audit_floor) / bare:.1f}x bare: what any upsert must write)"
                )
                print(
                    f"    naive executemany ON CONFLICT       {slow * 1000:10,.0f} ms"
                    f"  ({slow / bare:.1f}x bare, no audit)"
                )
                print(
                    f"    Django bulk_create(update_conflicts) {slower * 1000:9,.0f} ms"
                    f"  ({slower / bare:.1f}x bare, no audit)"
                )
