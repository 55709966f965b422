"""Small helpers that write platform rows into an environment's test database with SQL."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import connections

from billing_ops.environments import Environment

ENTITY_TYPES = ("points-of-delivery", "customers", "vat-rates", "currencies")


def make_run(
    env: Environment,
    run_id: int,
    *,
    status: str = "COMPLETED",
    stage: str = "ACCOUNTING",
    created: datetime | None = None,
    modified: datetime | None = None,
    number: str | None = None,
) -> int:
    created = created or datetime(2025, 12, 22, 11, 2, 8)
    modified = modified or created + timedelta(seconds=20)
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing.billings"
            " (id, billing_number, status, process_stage, create_date, modify_date)"
            " VALUES (%s, %s, %s::text::billing.billing_status, %s, %s, %s)",
            [run_id, number or f"BILLING{run_id:012d}", status, stage, created, modified],
        )
    return run_id


def make_locks(
    env: Environment,
    run_id: int | None,
    count: int,
    *,
    entity_type: str | None = None,
    system: bool = True,
    prefix: str = "",
    created: datetime | None = None,
) -> None:
    """`count` locks for a run (or none: run_id None), cycling entity types unless one is given."""
    tag = prefix or f"r{run_id}-{'s' if system else 'u'}-{entity_type or 'mix'}"
    types = [entity_type] if entity_type else list(ENTITY_TYPES)
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO lock.locks
                (id, lock_key, entity_type, entity_id, billing_id, system_lock, create_date)
            SELECT %(tag)s || '-' || g, t.type || ':' || %(tag)s || g, t.type, %(tag)s || g, %(run)s,
                   %(system)s, coalesce(%(created)s, now()::timestamp)
            FROM generate_series(1, %(count)s) g
            CROSS JOIN LATERAL (
                SELECT (%(types)s::text[])[1 + (g %% cardinality(%(types)s::text[]))] AS type
            ) t
            """,
            {"tag": tag, "run": run_id, "system": system, "count": count, "types": types, "created": created},
        )


def make_invoice_line(
    env: Environment,
    *,
    invoice_id: str = "INV-1",
    unit_id: str = "U-1",
    line_type: str = "energy",
    description: str = "Energy charge",
    normalized_description: str | None = None,
    quantity: str = "1",
    amount: str = "10.00",
    created_at: datetime | None = None,
) -> str:
    """One invoice line; ``normalized_description`` defaults to the runbook's expression over
    ``description`` (pass another value to stand for a platform that filled it differently)."""
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO public.invoice_lines
                (invoice_id, unit_id, line_type, description, normalized_description,
                 quantity, amount, created_at)
            VALUES (%s, %s, %s, %s, coalesce(%s, regexp_replace(lower(trim(%s)), '\\s+', ' ', 'g')), %s, %s,
                    coalesce(%s, now()))
            RETURNING id::text
            """,
            [
                invoice_id,
                unit_id,
                line_type,
                description,
                normalized_description,
                description,
                quantity,
                amount,
                created_at,
            ],
        )
        return str(cursor.fetchone()[0])
