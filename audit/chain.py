"""The audit hash chain: the canonical form anyone can recompute.

Every ``audit_logs`` row links to the one before it in ``created_at`` order: its
``previous_hash`` is that row's ``hash`` (runbook §5.4). For rows the dashboard writes,
``hash`` is also recomputable from the row itself:

    hash = sha256_hex(utf8(canonical_json))
    canonical_json = JSON of the object
        {"action": ..., "created_at": ..., "new_data": ..., "old_data": ...,
         "previous_hash": ..., "record_id": ...}
      - keys sorted at every level, separators "," and ":" (no spaces), non-ASCII kept
        as UTF-8 (not \\u escapes);
      - created_at in UTC as "YYYY-MM-DDTHH:MM:SS.ffffffZ" (always six fraction digits),
        so the session's TimeZone and DateStyle never change the hash;
      - every value inside old_data/new_data is a JSON string (numbers are written as the
        column's text, e.g. "10.50"), so 10.5 and 10.50 never hash alike by accident and
        no float rounding enters;
      - previous_hash is null for the first row of a chain.

Rows the dashboard writes carry ``"hash_scheme": "billing-ops/1"`` in ``new_data``; rows
of other writers (whose formula is unknown) are checked for linkage only.

The dashboard's own audit trail (``audit.models.AuditEntry`` in ``default``) is chained
with this same canonical form; ``dashboard_entry_fields`` says how its columns map onto
it, so that anyone can recompute an entry's hash from the row alone.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

HASH_SCHEME = "billing-ops/1"


def format_created_at(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("created_at must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(
    *,
    action: str,
    record_id: str | None,
    old_data: dict[str, Any] | None,
    new_data: dict[str, Any] | None,
    created_at: datetime,
    previous_hash: str | None,
) -> str:
    return json.dumps(
        {
            "action": action,
            "created_at": format_created_at(created_at),
            "new_data": new_data,
            "old_data": old_data,
            "previous_hash": previous_hash,
            "record_id": record_id,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def entry_hash(**fields: Any) -> str:
    return hashlib.sha256(canonical_json(**fields).encode("utf-8")).hexdigest()


def is_ours(new_data: dict[str, Any] | None) -> bool:
    return bool(new_data) and new_data.get("hash_scheme") == HASH_SCHEME  # type: ignore[union-attr]


def dashboard_entry_fields(
    *,
    action: str,
    object_type: str,
    object_id: str,
    actor_id: int | None,
    actor_name: str,
    environment: str,
    params: dict[str, Any],
    outcome: dict[str, Any],
    created_at: datetime,
    previous_hash: str | None,
) -> dict[str, Any]:
    """The canonical fields of a dashboard audit entry (pass them to ``entry_hash``).

    - action: the entry's action (``job.approved``);
    - record_id: ``"<object_type>:<object_id>"`` (``"job:42"``), null when both are blank;
    - old_data: null (an entry records an event, not a row's before and after);
    - new_data: ``{"actor": actor_name, "actor_id": the user's id as a string or null,
      "environment": ..., "params": ..., "outcome": ..., "hash_scheme": HASH_SCHEME}``,
      with ``params`` and ``outcome`` exactly as stored: their leaves are already strings
      (or null) when written, so the stored JSON is what is hashed;
    - created_at and previous_hash: the columns.
    """
    return {
        "action": action,
        "record_id": f"{object_type}:{object_id}" if object_type or object_id else None,
        "old_data": None,
        "new_data": {
            "actor": actor_name,
            "actor_id": None if actor_id is None else str(actor_id),
            "environment": environment,
            "params": params,
            "outcome": outcome,
            "hash_scheme": HASH_SCHEME,
        },
        "created_at": created_at,
        "previous_hash": previous_hash,
    }
