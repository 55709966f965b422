"""Sessions on invoice_lines (runbook §5.2) with real blocking sessions: the list, who
blocks whom, and cancelling or terminating one (approvers only, audited)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ValidationError
from django.db import connections

from audit.models import AuditEntry
from billing_ops.environments import environment_connect
from reconciliation import sessions
from tests.conftest import wait_for

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

INSERT = (
    "INSERT INTO public.invoice_lines (invoice_id, unit_id, line_type, description, normalized_description)"
    " VALUES ('INV-9', 'U-9', 'energy', 'COPY stand-in', 'copy stand-in')"
)


class Session:
    """A connection to the environment whose statements run in a thread of their own."""

    def __init__(self, env: Any) -> None:
        self.conn = environment_connect(env)
        self.pid = self.conn.info.backend_pid
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, statement: str) -> None:
        def work() -> None:
            try:
                self.conn.execute(statement)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=work, daemon=True)
        self.thread.start()

    def wait(self, timeout_s: float = 20) -> None:
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"session {self.pid} is still busy"

    @property
    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def close(self) -> None:
        if self.busy:
            self.conn.cancel()
            self.thread.join(10)  # type: ignore[union-attr]
        self.conn.close()


@pytest.fixture
def open_sessions(unprotected_env, clean_environments) -> Iterator[Any]:
    opened: list[Session] = []

    def open_session() -> Session:
        session = Session(unprotected_env)
        opened.append(session)
        return session

    yield open_session
    for session in opened:
        session.close()


def listed(env) -> dict[int, sessions.InvoiceLinesSession]:
    return {s.pid: s for s in sessions.invoice_lines_sessions(env)}


def blocked(env, waiter: Session, blocker: Session) -> dict[int, sessions.InvoiceLinesSession]:
    """Wait until the list shows ``waiter`` waiting on ``blocker``."""

    def check() -> dict[int, sessions.InvoiceLinesSession] | None:
        now = listed(env)
        return now if waiter.pid in now and now[waiter.pid].blocked_by == (blocker.pid,) else None

    return wait_for(check, timeout_s=20, what=f"session {waiter.pid} blocked by {blocker.pid}")


def post_signal(client, env, session: sessions.InvoiceLinesSession, *, terminate: bool = False):
    data = {"pid": session.pid, "backend_start": session.backend_start.isoformat()}
    if terminate:
        data["terminate"] = "on"
    return client.post(f"/environments/{env.key}/reconciliation/sessions/signal/", data, follow=True)


def test_the_list_shows_who_blocks_whom_and_an_approver_cancels_the_blocker(
    unprotected_env, open_sessions, viewer, operator, approver, client_for
) -> None:
    env = unprotected_env
    holder, copier = open_sessions(), open_sessions()
    holder.conn.execute("LOCK TABLE public.invoice_lines IN SHARE MODE")
    holder.start("SELECT pg_sleep(60)")  # a long query holding the lock
    copier.start(INSERT)  # what a COPY/upsert into invoice_lines would do

    now = blocked(env, copier, holder)
    held, waiting = now[holder.pid], now[copier.pid]
    assert waiting.waiting and waiting.wait_event_type == "Lock"
    assert ("RowExclusiveLock", False) in [(lock.mode, lock.granted) for lock in waiting.locks]
    assert ("ShareLock", True) in [(lock.mode, lock.granted) for lock in held.locks]
    assert held.blocking == (copier.pid,) and held.state == "active" and "pg_sleep" in held.query
    assert held.application_name.startswith("billing-ops") and held.query_age_s is not None

    # Everyone who may read sees it; only approvers get the buttons.
    page = client_for(viewer).get(f"/environments/{env.key}/reconciliation/sessions/").content.decode()
    assert f'data-pid="{copier.pid}" data-blocked-by="{holder.pid}"' in page
    assert f'data-pid="{holder.pid}" data-blocked-by="" data-blocking="{copier.pid}"' in page
    assert "Cancel query" not in page
    fragment = client_for(viewer).get(
        f"/environments/{env.key}/reconciliation/sessions/", headers={"HX-Request": "true"}
    )
    assert (
        "<html" not in fragment.content.decode() and f'data-pid="{holder.pid}"' in fragment.content.decode()
    )

    # Viewers and operators cannot signal it.
    for user in (viewer, operator):
        assert post_signal(client_for(user), env, held).status_code == 403
    assert holder.busy and copier.busy
    assert not AuditEntry.objects.filter(action__startswith="backend.").exists()

    # An approver cancels the blocking query: the lock goes, the insert goes through.
    page = client_for(approver).get(f"/environments/{env.key}/reconciliation/sessions/").content.decode()
    assert "Cancel query" in page
    response = post_signal(client_for(approver), env, held)
    assert f"Cancel sent to session {holder.pid}" in response.content.decode()
    holder.wait()
    assert isinstance(holder.error, psycopg.errors.QueryCanceled)
    holder.conn.rollback()
    copier.wait()
    assert copier.error is None
    entry = AuditEntry.objects.get(action="backend.cancelled")
    assert entry.actor_name == approver.username and entry.environment == env.key
    assert entry.object_id == str(holder.pid) and "pg_sleep" in entry.params["query"]
    assert entry.params["blocking"] == [str(copier.pid)] and entry.outcome["signalled"] == "true"


def test_terminating_ends_an_idle_in_transaction_blocker(
    unprotected_env, open_sessions, approver, client_for
) -> None:
    env = unprotected_env
    holder, copier = open_sessions(), open_sessions()
    holder.conn.execute("LOCK TABLE public.invoice_lines IN SHARE MODE")  # then it stays idle
    copier.start(INSERT)
    held = blocked(env, copier, holder)[holder.pid]
    assert held.state == "idle in transaction"
    response = post_signal(client_for(approver), env, held, terminate=True)
    assert f"Session {holder.pid} terminated" in response.content.decode()
    copier.wait()
    assert copier.error is None
    with pytest.raises(psycopg.OperationalError):
        holder.conn.execute("SELECT 1")
    assert AuditEntry.objects.get(action="backend.terminated").object_id == str(holder.pid)


def test_a_session_that_is_not_on_invoice_lines_is_refused(
    unprotected_env, open_sessions, approver, client_for
) -> None:
    env = unprotected_env
    bystander = open_sessions()
    bystander.start("SELECT pg_sleep(1.5)")  # busy, but not with invoice_lines
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT backend_start FROM pg_stat_activity WHERE pid = %s", [bystander.pid])
        backend_start = cursor.fetchone()[0]
    response = client_for(approver).post(
        f"/environments/{env.key}/reconciliation/sessions/signal/",
        {"pid": bystander.pid, "backend_start": backend_start.isoformat()},
        follow=True,
    )
    assert "is not holding or waiting for a lock on invoice_lines" in response.content.decode()
    bystander.wait()
    assert bystander.error is None  # never cancelled
    assert not AuditEntry.objects.filter(action__startswith="backend.").exists()


def test_a_pid_now_belonging_to_another_backend_is_refused(unprotected_env, open_sessions, approver) -> None:
    env = unprotected_env
    holder, copier = open_sessions(), open_sessions()
    holder.conn.execute("LOCK TABLE public.invoice_lines IN SHARE MODE")
    copier.start(INSERT)
    held = blocked(env, copier, holder)[holder.pid]
    with pytest.raises(ValidationError, match="nothing was sent"):
        sessions.session_signal(
            actor=approver, env=env, pid=held.pid, backend_start=held.backend_start - timedelta(seconds=1)
        )
    assert copier.busy  # the blocker was left alone
    holder.conn.rollback()
    copier.wait()


def test_no_sessions_is_said_plainly(unprotected_env, clean_environments, viewer, client_for) -> None:
    page = (
        client_for(viewer)
        .get(f"/environments/{unprotected_env.key}/reconciliation/sessions/")
        .content.decode()
    )
    assert 'data-sessions="0"' in page
