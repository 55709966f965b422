"""Sessions on ``public.invoice_lines``: who holds or waits for its locks, and who blocks
whom (runbook §5.2, "Long-running COPY"), and cancelling one of them.

The list is ``pg_locks`` (relation locks on the table and its indexes, granted or
waited for) joined to ``pg_stat_activity``, with ``pg_blocking_pids`` for each session;
the dashboard's own session is left out. Cancelling (``pg_cancel_backend``) or
terminating (``pg_terminate_backend``) is an approver's action, done at once, and only
for a session that is in that list at that moment: the signal is sent by the same
statement that checks the pid still belongs to the same backend (its ``backend_start``)
and still holds or waits for a lock on the table, so a pid that finished, or was reused
by another backend, is refused. Every signal is recorded in the audit trail.

What the dashboard's database user may see and do is PostgreSQL's rule: other users'
queries read ``<insufficient privilege>`` without ``pg_read_all_stats``, and signalling
another user's backend needs membership of its role or of ``pg_signal_backend``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import DatabaseError, connections
from django.utils.translation import gettext as _

from audit.services import audit_record
from billing_ops import access
from billing_ops.environments import Environment
from billing_ops.services import Actor

# The page shows this much of each query.
QUERY_TEXT_CHARS = 1_000

# Relation locks on the table and its indexes, per session.
_TARGET_LOCKS = """
target AS (
    SELECT c.oid, c.oid::regclass::text AS name
      FROM pg_class c WHERE c.oid = to_regclass('public.invoice_lines')
    UNION ALL
    SELECT i.indexrelid, i.indexrelid::regclass::text
      FROM pg_index i WHERE i.indrelid = to_regclass('public.invoice_lines')
),
locks AS (
    SELECT l.pid,
           array_agg(t.name ORDER BY l.granted DESC, t.name, l.mode) AS relations,
           array_agg(l.mode ORDER BY l.granted DESC, t.name, l.mode) AS modes,
           array_agg(l.granted ORDER BY l.granted DESC, t.name, l.mode) AS granted
      FROM pg_locks l
      JOIN target t ON t.oid = l.relation
     WHERE l.locktype = 'relation'
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND l.pid IS NOT NULL
     GROUP BY l.pid
)
"""

SESSIONS_SQL = f"""
WITH {_TARGET_LOCKS}
SELECT a.pid, a.usename::text, a.application_name, a.client_addr::text, a.state,
       a.wait_event_type, a.wait_event, a.backend_start, a.xact_start, a.query_start,
       extract(epoch FROM clock_timestamp() - a.query_start)::float8,
       left(a.query, %s), length(a.query) > %s,
       k.relations, k.modes, k.granted, pg_blocking_pids(a.pid)
  FROM locks k
  JOIN pg_stat_activity a ON a.pid = k.pid
 WHERE a.pid <> pg_backend_pid()
 ORDER BY a.query_start NULLS LAST, a.pid
"""

# Check and signal in one statement: the same backend, still on the table.
SIGNAL_SQL = f"""
WITH {_TARGET_LOCKS}
SELECT CASE WHEN %s THEN pg_terminate_backend(a.pid) ELSE pg_cancel_backend(a.pid) END
  FROM pg_stat_activity a
  JOIN locks k ON k.pid = a.pid
 WHERE a.pid = %s AND a.backend_start = %s AND a.pid <> pg_backend_pid()
"""


@dataclass(frozen=True)
class TableLock:
    relation: str
    mode: str
    granted: bool


@dataclass(frozen=True)
class InvoiceLinesSession:
    pid: int
    user: str
    application_name: str
    client_addr: str
    state: str
    wait_event_type: str
    wait_event: str
    backend_start: datetime
    xact_start: datetime | None
    query_start: datetime | None
    query_age_s: float | None
    query: str
    query_truncated: bool
    locks: tuple[TableLock, ...]
    blocked_by: tuple[int, ...]
    blocking: tuple[int, ...] = ()

    @property
    def waiting(self) -> bool:
        return any(not lock.granted for lock in self.locks)

    def as_audit(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "backend_start": self.backend_start,
            "user": self.user,
            "application_name": self.application_name,
            "client_addr": self.client_addr,
            "state": self.state,
            "query_start": self.query_start,
            "query": self.query,
            "locks": [
                f"{lock.mode}{'' if lock.granted else ' (waiting)'} on {lock.relation}" for lock in self.locks
            ],
            "blocked_by": list(self.blocked_by),
            "blocking": list(self.blocking),
        }


def _sessions(cursor: Any) -> list[InvoiceLinesSession]:
    cursor.execute(SESSIONS_SQL, [QUERY_TEXT_CHARS, QUERY_TEXT_CHARS])
    rows = [
        InvoiceLinesSession(
            pid=pid,
            user=user or "",
            application_name=app or "",
            client_addr=addr or "",
            state=state or "",
            wait_event_type=wait_type or "",
            wait_event=wait_event or "",
            backend_start=backend_start,
            xact_start=xact_start,
            query_start=query_start,
            query_age_s=age,
            query=query or "",
            query_truncated=bool(truncated),
            locks=tuple(TableLock(r, m, g) for r, m, g in zip(relations, modes, granted, strict=True)),
            blocked_by=tuple(blockers or ()),
        )
        for (
            pid,
            user,
            app,
            addr,
            state,
            wait_type,
            wait_event,
            backend_start,
            xact_start,
            query_start,
            age,
            query,
            truncated,
            relations,
            modes,
            granted,
            blockers,
        ) in cursor.fetchall()
    ]
    blocking: dict[int, list[int]] = {}
    for session in rows:
        for blocker in session.blocked_by:
            blocking.setdefault(blocker, []).append(session.pid)
    return [replace(session, blocking=tuple(blocking.get(session.pid, ()))) for session in rows]


def invoice_lines_sessions(env: Environment) -> list[InvoiceLinesSession]:
    """Every other session holding or waiting for a lock on public.invoice_lines (or one of
    its indexes), oldest query first, with who blocks whom."""
    with connections[env.alias].cursor() as cursor:
        return _sessions(cursor)


def session_signal(
    *, actor: Actor, env: Environment, pid: int, backend_start: datetime, terminate: bool = False
) -> InvoiceLinesSession:
    """Cancel the query of (or terminate) a session on public.invoice_lines; approvers only.

    Refused (ValidationError) unless the session is on the table right now; recorded in the
    audit trail as ``backend.cancelled`` or ``backend.terminated`` with its query and who.
    """
    access.require_approver(actor)
    with connections[env.alias].cursor() as cursor:
        session = next(
            (s for s in _sessions(cursor) if s.pid == pid and s.backend_start == backend_start),
            None,
        )
        if session is None:
            raise ValidationError(
                _(
                    "Session %(pid)s is not holding or waiting for a lock on invoice_lines any more (it "
                    "finished, or the pid now belongs to another session): nothing was sent. "
                    "Refresh the list."
                )
                % {"pid": pid}
            )
        try:
            cursor.execute(SIGNAL_SQL, [terminate, pid, backend_start])
            row = cursor.fetchone()
        except DatabaseError as exc:  # e.g. not allowed to signal that role's backends
            raise ValidationError(
                _("PostgreSQL refused to signal session %(pid)s: %(error)s")
                % {"pid": pid, "error": str(exc).strip().splitlines()[0] if str(exc).strip() else exc}
            ) from None
    if row is None:
        raise ValidationError(
            _("Session %(pid)s left invoice_lines just now: nothing was sent. Refresh the list.")
            % {"pid": pid}
        )
    signalled = bool(row[0])
    audit_record(
        actor=actor,
        action="backend.terminated" if terminate else "backend.cancelled",
        environment=env.key,
        object_type="backend",
        object_id=pid,
        params=session.as_audit(),
        outcome={"signalled": signalled},
    )
    if not signalled:
        raise ValidationError(
            _("PostgreSQL did not signal session %(pid)s (it may have ended).") % {"pid": pid}
        )
    return session
