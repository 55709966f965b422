"""Appending to the dashboard's own audit trail: every operator action, one chained entry.

``audit_record`` is the only writer of ``AuditEntry``. Each entry extends one linear hash
chain (``audit.chain``'s canonical form, mapped by ``dashboard_entry_fields``), so the
order of entries and their content can be verified later (``audit.selectors``).

Several web and worker processes append at once. To keep one chain, an append takes a
transaction-level advisory lock, reads the last entry, and inserts after it with
``created_at = max(clock_timestamp(), last.created_at + 1 µs)`` from the database's clock
(the hosts' clocks may disagree). The lock is held until the *outermost* transaction
ends, because a second appender must not read the "last entry" before ours is committed.
Hence, as in zulip's actions, record the entry at the end of the action's own
transaction, once its outcome is known:

* inside the caller's ``transaction.atomic()`` the entry commits with the action, and
  rolls back with it (an action that did not happen leaves no entry);
* an action that failed and rolled back is recorded afterwards, in a transaction of its
  own (call ``audit_record`` outside the failed block), with the failure as its outcome;
* work done after ``audit_record`` in the same transaction delays every other appender
  (they wait on the lock, up to the statement timeout): keep it short.

The chain needs READ COMMITTED (Django's default): under REPEATABLE READ the "last entry"
could be stale; the unique constraint on ``previous_hash`` then refuses the fork rather
than let the chain branch.

Values in ``params`` and ``outcome`` are stored as the canonical form hashes them: every
leaf a string (``audit_values``), so that the stored JSON is exactly what is hashed and
verification never needs to know a value's original type.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection, transaction
from django.utils.functional import Promise

from audit.chain import dashboard_entry_fields, entry_hash, format_created_at
from audit.models import AuditAction, AuditEntry

# pg_advisory_xact_lock key serialising appends to the chain ("billaud1").
AUDIT_CHAIN_ADVISORY_LOCK_KEY = 0x62696C6C61756431
# created_at strictly increases along the chain, by at least this much.
CHAIN_TICK = timedelta(microseconds=1)
# The hash never sees the server's text for a time (audit.chain formats the value in UTC),
# but reading the value right needs the session as Django assumes it: the connection's own
# TimeZone (Django labels the times it reads with it) and an ISO DateStyle (the only one
# psycopg parses). Both are set for the transaction, whatever the session was changed to.
CHAIN_DATESTYLE = "ISO"

# Actors without a user account. System actors are "system:<process>".
SYSTEM_ACTOR_PREFIX = "system:"
SYSTEM_SCHEDULER = "system:scheduler"
SYSTEM_WORKER = "system:worker"
SYSTEM_SWEEPER = "system:sweeper"
ANONYMOUS_ACTOR = "anonymous"

# PostgreSQL text and jsonb cannot hold NUL; it is replaced, never refused (a login
# attempt must be recorded whatever bytes it carried).
NUL = "\x00"
NUL_REPLACEMENT = "\ufffd"

AuditActor = AbstractBaseUser | AnonymousUser | str


def audit_record(
    *,
    actor: AuditActor,
    action: str,
    environment: str = "",
    object_type: str = "",
    object_id: str | int = "",
    params: Mapping[str, Any] | None = None,
    outcome: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry to the dashboard's audit chain (in the caller's transaction, if any).

    ``actor`` is the signed-in user, an ``AnonymousUser`` or ``ANONYMOUS_ACTOR`` (a failed
    login), or a system actor such as ``SYSTEM_SCHEDULER``. ``params`` and ``outcome`` are
    stored with every leaf as a string (see ``audit_values``).
    """
    if action not in AuditAction.values:
        raise ValueError(f"unknown audit action {action!r}: name it in audit.models.AuditAction first")
    actor_id, actor_name = _actor(actor)
    entry = AuditEntry(
        actor_id=actor_id,
        actor_name=actor_name,
        action=_text(action),
        environment=_text(environment),
        object_type=_text(object_type),
        object_id=_text(str(object_id)),
        params=audit_values(params or {}),
        outcome=audit_values(outcome or {}),
    )
    table = connection.ops.quote_name(AuditEntry._meta.db_table)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_advisory_xact_lock(%s),"
            " set_config('TimeZone', %s, true), set_config('DateStyle', %s, true)",
            [AUDIT_CHAIN_ADVISORY_LOCK_KEY, connection.timezone_name, CHAIN_DATESTYLE],
        )
        # After the lock: our clock reading and the last entry are both newer than any
        # entry committed before us.
        cursor.execute(
            f"""
            SELECT clock_timestamp(), tail.hash, tail.created_at
              FROM (SELECT 1) AS one
              LEFT JOIN LATERAL (
                    SELECT hash, created_at FROM {table} ORDER BY created_at DESC LIMIT 1
              ) AS tail ON true
            """
        )
        now, last_hash, last_created_at = cursor.fetchone()
        entry.created_at = now if last_created_at is None else max(now, last_created_at + CHAIN_TICK)
        entry.previous_hash = last_hash
        entry.hash = entry_hash(**audit_entry_fields(entry))
        entry.save()
    return entry


def audit_entry_fields(entry: AuditEntry) -> dict[str, Any]:
    """The canonical fields of a stored (or about to be stored) entry, for ``entry_hash``."""
    return dashboard_entry_fields(
        action=entry.action,
        object_type=entry.object_type,
        object_id=entry.object_id,
        actor_id=entry.actor_id,
        actor_name=entry.actor_name,
        environment=entry.environment,
        params=entry.params,
        outcome=entry.outcome,
        created_at=entry.created_at,
        previous_hash=entry.previous_hash,
    )


def audit_values(value: Mapping[str, Any]) -> dict[str, Any]:
    """``value`` with every leaf written as a string, as the chain's canonical form wants.

    - strings stay (NUL replaced by U+FFFD); lazy translations become their text;
    - ``None`` stays null: "not given" must not read like the text "None";
    - booleans become ``"true"`` / ``"false"``; integers and ``Decimal`` their text
      (``Decimal("10.50")`` -> ``"10.50"``); floats their shortest repr (``0.1`` -> ``"0.1"``);
    - aware datetimes UTC ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (naive ones are refused), dates
      ``YYYY-MM-DD``, UUIDs their canonical text, enums (``TextChoices``) their value;
    - mappings keep their structure with string keys (integer keys become text); lists and
      tuples become lists. Anything else (a model instance, a set) is refused: say what to
      record, e.g. its id.
    """
    if not isinstance(value, Mapping):
        raise TypeError(f"audit params and outcome are mappings, not {type(value).__name__}")
    result = _leaves(value, path="")
    assert isinstance(result, dict)
    return result


def _leaves(value: Any, *, path: str) -> Any:
    if value is None:
        return None
    if isinstance(value, enum.Enum):
        return _leaves(value.value, path=path)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, Promise):
        return _text(str(value))
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"audit value {path or '(root)'} is a naive datetime")
        return format_created_at(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for key, item in value.items():
            text_key = _key(key, path=path)
            if text_key in result:
                raise ValueError(f"audit value {path or '(root)'} has the key {text_key!r} twice")
            result[text_key] = _leaves(item, path=f"{path}.{text_key}" if path else text_key)
        return result
    if isinstance(value, list | tuple):
        return [_leaves(item, path=f"{path}[{n}]") for n, item in enumerate(value)]
    raise TypeError(f"audit value {path or '(root)'} is a {type(value).__name__}; record its text or id")


def _key(key: Any, *, path: str) -> str:
    if isinstance(key, enum.Enum):
        key = key.value
    if isinstance(key, str):
        return _text(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key)
    raise TypeError(f"audit value {path or '(root)'} has a {type(key).__name__} key")


def _text(value: str) -> str:
    return str.__str__(value).replace(NUL, NUL_REPLACEMENT)


def _actor(actor: AuditActor) -> tuple[int | None, str]:
    if isinstance(actor, str):
        if actor != ANONYMOUS_ACTOR and not (
            actor.startswith(SYSTEM_ACTOR_PREFIX) and len(actor) > len(SYSTEM_ACTOR_PREFIX)
        ):
            raise ValueError(
                f"audit actor {actor!r}: pass the user, {ANONYMOUS_ACTOR!r} or a system actor "
                f"'{SYSTEM_ACTOR_PREFIX}<process>'"
            )
        return None, _text(actor)
    if isinstance(actor, AnonymousUser) or not actor.is_authenticated:
        return None, ANONYMOUS_ACTOR
    return actor.pk, _text(actor.get_username())
