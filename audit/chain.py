"""The audit hash chain: the canonical form anyone can recompute.

Every ``audit_logs`` row links to the one before it in ``created_at`` order: its
``previous_hash`` is that row's ``hash`` (runbook §5.4). For rows the dashboard writes,
``hash`` is also recomputable from the row itself, in two steps:

    content_hash = sha256_hex(utf8(canonical_json))
    hash         = sha256_hex(ascii((previous_hash or "") + content_hash))

    canonical_json = JSON of the object
        {"action": ..., "created_at": ..., "new_data": ..., "old_data": ..., "record_id": ...}
      - keys sorted at every level, separators "," and ":" (no spaces), non-ASCII kept
        as UTF-8 (not \\u escapes); control characters, '"' and '\\' escaped as JSON requires
        (\\n, \\t, \\u001f, ...), lower-case hex;
      - created_at in UTC as "YYYY-MM-DDTHH:MM:SS.ffffffZ" (always six fraction digits),
        so the session's TimeZone and DateStyle never change the hash;
      - every value inside old_data/new_data is a JSON string (numbers are written as the
        column's text, e.g. "10.500000" for numeric(18, 6)), so 10.5 and 10.50 hash alike
        and no float rounding enters;
      - previous_hash is "" for the first row of a chain (and null in the column).

The content hash does not depend on the chain; only the cheap second step must run in
order (``reconciliation.auditlog`` computes both as it writes a run's rows).

Rows the dashboard writes carry ``"hash_scheme": "billing-ops/2"`` in ``new_data``; rows
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

HASH_SCHEME = "billing-ops/2"


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
) -> str:
    return json.dumps(
        {
            "action": action,
            "created_at": format_created_at(created_at),
            "new_data": new_data,
            "old_data": old_data,
            "record_id": record_id,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


def content_hash(**fields: Any) -> str:
    """sha256 of the row's canonical JSON (everything but its place in the chain)."""
    return hashlib.sha256(canonical_json(**fields).encode("utf-8")).hexdigest()


def chain_hash(previous_hash: str | None, content: str) -> str:
    """The row's hash: its content hash chained to the hash of the row before it."""
    return hashlib.sha256(((previous_hash or "") + content).encode("ascii")).hexdigest()


def entry_hash(*, previous_hash: str | None, **fields: Any) -> str:
    return chain_hash(previous_hash, content_hash(**fields))


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
