"""Temporary: replaced by the index check (runbook §2.2)."""

from __future__ import annotations

from typing import Any


def require_dedup_index(cursor: Any) -> None:
    cursor.execute(
        """
        SELECT i.indisvalid AND i.indisready AND i.indisunique
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relname = 'idx_invoice_lines_dedup'
        """
    )
    row = cursor.fetchone()
    if row is None or not row[0]:
        from reconciliation.upsert import UpsertRefused

        raise UpsertRefused("the dedup index idx_invoice_lines_dedup is missing or invalid")
