"""The dashboard's own audit trail: the chain, append-only, verification, the command."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import AnonymousUser, User
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, connections, transaction

from audit.chain import HASH_SCHEME, entry_hash, format_created_at
from audit.models import AppendOnlyError, AuditAction, AuditEntry
from audit.selectors import (
    LINK_WINDOW_ROWS,
    DamageKind,
    audit_csv,
    audit_entries,
    dashboard_chain_verify,
    environment_chain_verify,
)
from audit.services import (
    ANONYMOUS_ACTOR,
    SYSTEM_SCHEDULER,
    audit_entry_fields,
    audit_record,
    audit_values,
)
from billing_ops.environments import Environment
from tests.conftest import BASE_DIR, make_user

pytestmark = pytest.mark.django_db

THREADS = 4
ENTRIES_PER_THREAD = 25
BIG_CHAIN_ENTRIES = 10_000
# Verifying streams: its peak is one fetched chunk (measured ~7 MB for 2,000 of these
# entries with ~1 KB of params each), far below holding all 10,000 (measured ~38 MB).
VERIFY_PEAK_BOUND_BYTES = 12 * 1024 * 1024
INSUFFICIENT_PRIVILEGE = "42501"


def record(n: int) -> list[AuditEntry]:
    return [
        audit_record(
            actor=SYSTEM_SCHEDULER,
            action="job.requested",
            environment="test",
            object_type="job",
            object_id=k,
            params={"n": k},
        )
        for k in range(n)
    ]


@contextmanager
def tampering(*, linear: bool = True) -> Iterator[Any]:
    """A cursor on the audit table with its append-only triggers off, as an intruder with
    the owner's rights would have it; ``linear=False`` also drops the index that keeps the
    chain from forking (the test's transaction restores both)."""
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE audit_entry DISABLE TRIGGER USER")
        if not linear:
            cursor.execute("DROP INDEX audit_entry_one_successor")
        try:
            yield cursor
        finally:
            cursor.execute("ALTER TABLE audit_entry ENABLE TRIGGER USER")


def forgery(*, created_at: datetime, previous_hash: str | None) -> AuditEntry:
    """An entry whose hash recomputes (the formula is public), linked as told."""
    entry = AuditEntry(
        actor_name="system:intruder",
        action="locks.released",
        object_type="run",
        object_id="1620",
        params={},
        outcome={},
        created_at=created_at,
        previous_hash=previous_hash,
    )
    entry.hash = entry_hash(**audit_entry_fields(entry))
    return entry


def forge(cursor: Any, *, created_at: datetime, previous_hash: str | None) -> int:
    entry = forgery(created_at=created_at, previous_hash=previous_hash)
    cursor.execute(
        "INSERT INTO audit_entry (created_at, actor_name, action, environment, object_type, object_id,"
        " params, outcome, hash, previous_hash)"
        " VALUES (%s, %s, %s, '', %s, %s, '{}', '{}', %s, %s) RETURNING id",
        [
            created_at,
            entry.actor_name,
            entry.action,
            entry.object_type,
            entry.object_id,
            entry.hash,
            previous_hash,
        ],
    )
    return int(cursor.fetchone()[0])


def midpoint(a: AuditEntry, b: AuditEntry) -> datetime:
    return a.created_at + (b.created_at - a.created_at) / 2


def kinds(report: Any) -> dict[int, set[DamageKind]]:
    found: dict[int, set[DamageKind]] = {}
    for damage in report.damages:
        found.setdefault(damage.entry_id, set()).add(damage.kind)
    return found


# --- The chain ---------------------------------------------------------------------------------


def test_it_chains_every_entry_to_the_one_before() -> None:
    operator = make_user("operator1", "Operator")
    first = audit_record(
        actor=operator, action="job.requested", environment="test", object_type="job", object_id=7
    )
    second = audit_record(
        actor=SYSTEM_SCHEDULER, action=AuditAction.JOB_FINISHED, object_type="job", object_id="7"
    )
    third = audit_record(actor=AnonymousUser(), action="auth.login_failed", params={"username": "mallory"})

    stored = list(AuditEntry.objects.order_by("created_at"))
    assert [e.pk for e in stored] == [first.pk, second.pk, third.pk]
    assert stored[0].previous_hash is None
    assert stored[1].previous_hash == stored[0].hash and stored[2].previous_hash == stored[1].hash
    assert stored[0].created_at < stored[1].created_at < stored[2].created_at
    for entry in stored:
        assert entry.hash == entry_hash(**audit_entry_fields(entry))
    assert (stored[0].actor_id, stored[0].actor_name) == (operator.pk, "operator1")
    assert (stored[1].actor_id, stored[1].actor_name, stored[1].action) == (
        None,
        "system:scheduler",
        "job.finished",
    )
    assert type(second.action) is str
    assert (stored[2].actor_id, stored[2].actor_name) == (None, ANONYMOUS_ACTOR)

    report = dashboard_chain_verify()
    assert report.intact and report.entries == 3 and report.damages == []
    assert report.head is not None and (report.head.entry_id, report.head.hash) == (third.pk, stored[2].hash)
    assert report.verified_head == report.head and report.first_broken is None


def test_the_hash_is_the_documented_canonical_form_of_the_row() -> None:
    entry = audit_record(
        actor=SYSTEM_SCHEDULER,
        action="schedule.changed",
        object_type="schedule",
        object_id="cleanup",
        params={"cron": "0 2 * * *"},
        outcome={"ok": True},
    )
    entry.refresh_from_db()
    canonical = json.dumps(
        {
            "action": "schedule.changed",
            "created_at": entry.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "new_data": {
                "actor": "system:scheduler",
                "actor_id": None,
                "environment": "",
                "hash_scheme": HASH_SCHEME,
                "outcome": {"ok": "true"},
                "params": {"cron": "0 2 * * *"},
            },
            "old_data": None,
            "record_id": "schedule:cleanup",
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    content = hashlib.sha256(canonical.encode()).hexdigest()
    previous = AuditEntry.objects.filter(created_at__lt=entry.created_at).order_by("-created_at").first()
    assert entry.previous_hash == (previous.hash if previous else None)
    assert entry.hash == hashlib.sha256(((entry.previous_hash or "") + content).encode()).hexdigest()


def test_it_stores_every_leaf_of_params_and_outcome_as_a_string() -> None:
    at = datetime(2025, 12, 22, 11, 2, 8, 500, tzinfo=UTC)
    line = uuid.UUID("12345678-1234-5678-1234-567812345678")
    entry = audit_record(
        actor=SYSTEM_SCHEDULER,
        action="locks.released",
        params={
            "run": 1620,
            "dry_run": False,
            "amount": Decimal("10.50"),
            "ratio": 0.1,
            "at": at,
            "day": at.date(),
            "line": line,
            "note": None,
            "runs": [1620, 1621],
            "by_type": {7: {"customers": 3}},
        },
        outcome={"released": 1291, "label": "Z\u00fcrich \u10e5"},
    )
    entry.refresh_from_db()
    assert entry.params == {
        "run": "1620",
        "dry_run": "false",
        "amount": "10.50",
        "ratio": "0.1",
        "at": "2025-12-22T11:02:08.000500Z",
        "day": "2025-12-22",
        "line": str(line),
        "note": None,
        "runs": ["1620", "1621"],
        "by_type": {"7": {"customers": "3"}},
    }
    assert entry.outcome == {"released": "1291", "label": "Z\u00fcrich \u10e5"}
    assert dashboard_chain_verify().intact


def test_it_refuses_values_it_cannot_write_faithfully() -> None:
    with pytest.raises(ValueError, match="naive"):
        audit_values({"at": datetime(2025, 1, 1, 12, 0)})
    with pytest.raises(TypeError, match=r"params\.run is a User"):
        audit_values({"params": {"run": User(username="x")}})
    with pytest.raises(TypeError, match="set"):
        audit_values({"ids": {1, 2}})
    with pytest.raises(ValueError, match="twice"):
        audit_values({1: "a", "1": "b"})
    assert audit_values({"who": "a\x00b"}) == {"who": "a\ufffdb"}


def test_it_refuses_an_actor_that_is_neither_a_user_nor_a_system_actor() -> None:
    with pytest.raises(ValueError, match="system actor"):
        audit_record(actor="operator1", action="job.requested")
    with pytest.raises(ValueError, match="unknown audit action"):
        audit_record(actor=SYSTEM_SCHEDULER, action="Job Requested")
    with pytest.raises(ValueError, match="unknown audit action"):
        audit_record(actor=SYSTEM_SCHEDULER, action="job.invented")
    assert not AuditEntry.objects.exists()


def test_it_keeps_who_acted_when_the_user_is_deleted() -> None:
    user = make_user("leaver", "Operator")
    entry = audit_record(actor=user, action="job.cancelled", object_type="job", object_id=3)
    user.delete()
    stored = AuditEntry.objects.get(pk=entry.pk)
    assert (stored.actor_id, stored.actor_name) == (entry.actor_id, "leaver")
    assert dashboard_chain_verify().intact


def test_the_entry_commits_and_rolls_back_with_the_callers_transaction() -> None:
    kept = audit_record(actor=SYSTEM_SCHEDULER, action="job.requested")
    with pytest.raises(RuntimeError), transaction.atomic():
        audit_record(actor=SYSTEM_SCHEDULER, action="job.approved")
        raise RuntimeError("the action failed")
    after = audit_record(actor=SYSTEM_SCHEDULER, action="job.refused")
    assert list(AuditEntry.objects.order_by("created_at").values_list("action", flat=True)) == [
        "job.requested",
        "job.refused",
    ]
    assert AuditEntry.objects.get(pk=after.pk).previous_hash == kept.hash
    assert dashboard_chain_verify().intact


def test_created_at_strictly_increases_even_when_the_clock_is_behind_the_chain() -> None:
    ahead = datetime.now(UTC) + timedelta(hours=1)
    with connection.cursor() as cursor:
        forge(cursor, created_at=ahead, previous_hash=None)
    entry = audit_record(actor=SYSTEM_SCHEDULER, action="job.requested")
    assert entry.created_at == ahead + timedelta(microseconds=1)
    assert dashboard_chain_verify().intact


@pytest.mark.django_db(transaction=True)
def test_concurrent_appends_from_several_connections_keep_one_linear_chain() -> None:
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        try:
            start.wait()
            for n in range(ENTRIES_PER_THREAD):
                audit_record(actor=f"system:worker{worker}", action="job.finished", params={"n": n})
        except BaseException as exc:  # reported below; a thread must not die silently
            errors.append(exc)
        finally:
            connection.close()  # this thread's own connection

    threads = [threading.Thread(target=append, args=(w,)) for w in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    chain = list(
        AuditEntry.objects.order_by("created_at").values_list("id", "created_at", "hash", "previous_hash")
    )
    assert len(chain) == THREADS * ENTRIES_PER_THREAD
    previous: tuple[Any, ...] | None = None
    for row in chain:
        if previous is None:
            assert row[3] is None
        else:
            assert row[1] > previous[1] and row[3] == previous[2]
        previous = row
    assert [row[0] for row in chain] == sorted(row[0] for row in chain)
    report = dashboard_chain_verify()
    assert report.intact and report.entries == THREADS * ENTRIES_PER_THREAD


def test_the_hash_does_not_depend_on_the_sessions_time_zone_or_date_style() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Pacific/Chatham'")
        cursor.execute("SET DateStyle = 'SQL, DMY'")
    east = audit_record(actor=SYSTEM_SCHEDULER, action="job.requested", params={"at": "chatham"})
    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'America/Los_Angeles'")
        cursor.execute("SET DateStyle = 'German'")
    west = audit_record(actor=SYSTEM_SCHEDULER, action="job.requested", params={"at": "los angeles"})

    with connection.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'Asia/Kathmandu'")
        cursor.execute("SET DateStyle = 'Postgres, MDY'")
    report = dashboard_chain_verify()
    assert report.intact and report.entries == 2, report

    # Anyone can rebuild the canonical created_at in SQL, whatever their session says.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
            " FROM audit_entry ORDER BY created_at"
        )
        from_sql = cursor.fetchall()
    assert from_sql == [
        (east.pk, format_created_at(east.created_at)),
        (west.pk, format_created_at(west.created_at)),
    ]


# --- Append-only -------------------------------------------------------------------------------


def test_the_application_refuses_to_change_or_delete_entries() -> None:
    entry = record(1)[0]
    entry.action = "job.approved"
    with pytest.raises(AppendOnlyError):
        entry.save()
    with pytest.raises(AppendOnlyError):
        entry.delete()
    with pytest.raises(AppendOnlyError):
        AuditEntry.objects.filter(pk=entry.pk).update(action="job.approved")
    with pytest.raises(AppendOnlyError):
        AuditEntry.objects.all().delete()
    with pytest.raises(AppendOnlyError):
        AuditEntry.objects.create(
            actor_name="x", action="job.requested", created_at=datetime.now(UTC), hash="0" * 64
        )
    with pytest.raises(AppendOnlyError):
        AuditEntry.objects.bulk_create([AuditEntry(actor_name="x")])
    stored = AuditEntry.objects.get()
    assert stored.action == "job.requested" and dashboard_chain_verify().intact


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_entry SET action = 'job.approved'", "DELETE FROM audit_entry", "TRUNCATE audit_entry"],
)
def test_the_database_refuses_to_change_or_delete_entries(statement: str) -> None:
    record(2)
    with pytest.raises(DatabaseError) as caught, transaction.atomic(), connection.cursor() as cursor:
        # Test databases may be flushed with TRUNCATE; this session says it must not be.
        cursor.execute("SET LOCAL billing_ops.allow_audit_truncate = off")
        cursor.execute(statement)
    assert caught.value.__cause__.sqlstate == INSUFFICIENT_PRIVILEGE  # type: ignore[union-attr]
    assert "append-only" in str(caught.value)
    assert AuditEntry.objects.filter(action="job.requested").count() == 2


def test_the_test_runner_may_flush_a_test_database() -> None:
    # Transactional tests are followed by a TRUNCATE of every table: test_... databases allow it.
    record(2)
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        assert cursor.fetchone()[0].startswith("test_")
        cursor.execute("TRUNCATE audit_entry")
    assert not AuditEntry.objects.exists()


def test_a_session_can_deliberately_allow_truncate() -> None:
    record(2)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL billing_ops.allow_audit_truncate = on")
        cursor.execute("TRUNCATE audit_entry")
    assert not AuditEntry.objects.exists()


# --- Tampering is detected at the right entry ------------------------------------------------------


def test_it_reports_a_changed_entry() -> None:
    entries = record(5)
    with tampering() as cursor:
        cursor.execute("""UPDATE audit_entry SET params = '{"n": "999"}' WHERE id = %s""", [entries[2].pk])
    report = dashboard_chain_verify()
    assert kinds(report) == {entries[2].pk: {DamageKind.CONTENT_CHANGED}}
    assert report.first_broken is not None and report.first_broken.entry_id == entries[2].pk
    assert report.verified_head is not None
    assert (report.verified_head.entry_id, report.verified_head.hash) == (entries[1].pk, entries[1].hash)
    assert report.head is not None and report.head.entry_id == entries[4].pk


def test_it_reports_a_deleted_entry_at_the_entry_after_the_gap() -> None:
    entries = record(5)
    with tampering() as cursor:
        cursor.execute("DELETE FROM audit_entry WHERE id = %s", [entries[2].pk])
    report = dashboard_chain_verify()
    assert kinds(report) == {entries[3].pk: {DamageKind.ROW_DELETED}}
    assert entries[2].hash[:12] in report.damages[0].detail
    assert report.verified_head is not None and report.verified_head.entry_id == entries[1].pk


def test_it_reports_deleted_first_entries() -> None:
    entries = record(4)
    with tampering() as cursor:
        cursor.execute("DELETE FROM audit_entry WHERE id = ANY(%s)", [[entries[0].pk, entries[1].pk]])
    report = dashboard_chain_verify()
    assert kinds(report) == {entries[2].pk: {DamageKind.ROW_DELETED}}
    assert "before the first" in report.damages[0].detail
    assert report.verified_head is None


def test_it_reports_an_inserted_entry_that_nothing_links_to() -> None:
    entries = record(5)
    with tampering() as cursor:
        forged = forge(cursor, created_at=midpoint(entries[2], entries[3]), previous_hash="f" * 64)
    report = dashboard_chain_verify()
    assert kinds(report) == {forged: {DamageKind.ROW_INSERTED}}
    assert report.verified_head is not None and report.verified_head.entry_id == entries[2].pk


def test_it_reports_an_inserted_entry_that_the_next_entry_was_relinked_to() -> None:
    entries = record(5)
    at = midpoint(entries[2], entries[3])
    forged_hash = forgery(created_at=at, previous_hash=entries[2].hash).hash
    with tampering() as cursor:
        # The intruder points the next entry at the forgery: every link lines up again.
        cursor.execute(
            "UPDATE audit_entry SET previous_hash = %s WHERE id = %s", [forged_hash, entries[3].pk]
        )
        forged = forge(cursor, created_at=at, previous_hash=entries[2].hash)
    report = dashboard_chain_verify()
    assert kinds(report) == {forged: {DamageKind.ROW_INSERTED}, entries[3].pk: {DamageKind.CONTENT_CHANGED}}
    assert report.first_broken is not None and report.first_broken.entry_id == forged


def test_it_reports_an_inserted_entry_linked_beside_the_real_one() -> None:
    entries = record(5)
    with tampering(linear=False) as cursor:
        forged = forge(cursor, created_at=midpoint(entries[2], entries[3]), previous_hash=entries[2].hash)
    report = dashboard_chain_verify()
    assert kinds(report) == {forged: {DamageKind.ROW_INSERTED}}


def test_it_reports_two_forged_entries_in_a_row() -> None:
    entries = record(5)
    at = midpoint(entries[2], entries[3])
    with tampering() as cursor:
        first = forge(cursor, created_at=at, previous_hash="e" * 64)
        second = forge(
            cursor,
            created_at=at + timedelta(microseconds=1),
            previous_hash=AuditEntry.objects.get(pk=first).hash,
        )
    report = dashboard_chain_verify()
    assert kinds(report) == {first: {DamageKind.ROW_INSERTED}, second: {DamageKind.ROW_INSERTED}}


def test_it_reports_a_changed_hash_column_at_that_entry_only() -> None:
    entries = record(5)
    with tampering() as cursor:
        cursor.execute("UPDATE audit_entry SET hash = %s WHERE id = %s", ["a" * 64, entries[2].pk])
    report = dashboard_chain_verify()
    assert kinds(report) == {entries[2].pk: {DamageKind.CONTENT_CHANGED}}
    assert "hash column was changed" in report.damages[0].detail


@pytest.mark.parametrize("linear", [True, False], ids=["to-nowhere", "past-an-entry"])
def test_it_reports_an_altered_link_as_a_change_only(linear: bool) -> None:
    entries = record(5)
    with tampering(linear=linear) as cursor:
        target = "0" * 64 if linear else entries[1].hash
        cursor.execute("UPDATE audit_entry SET previous_hash = %s WHERE id = %s", [target, entries[3].pk])
    report = dashboard_chain_verify()
    assert kinds(report) == {entries[3].pk: {DamageKind.CONTENT_CHANGED}}
    assert "previous_hash was changed" in report.damages[0].detail


def test_it_reports_swapped_entries() -> None:
    entries = record(6)
    c, d = entries[2], entries[3]
    with tampering() as cursor:
        # Exchange their places in time (created_at is unique: go through a free moment).
        cursor.execute(
            "UPDATE audit_entry SET created_at = %s WHERE id = %s", [datetime(2000, 1, 1, tzinfo=UTC), c.pk]
        )
        cursor.execute("UPDATE audit_entry SET created_at = %s WHERE id = %s", [c.created_at, d.pk])
        cursor.execute("UPDATE audit_entry SET created_at = %s WHERE id = %s", [d.created_at, c.pk])
    report = dashboard_chain_verify()
    swapped = {DamageKind.ROWS_SWAPPED, DamageKind.CONTENT_CHANGED}  # created_at is hashed too
    assert kinds(report) == {c.pk: swapped, d.pk: swapped}
    assert report.first_broken is not None and report.first_broken.entry_id == d.pk
    assert report.verified_head is not None and report.verified_head.entry_id == entries[1].pk


def test_it_reports_an_entry_moved_further_than_its_window_as_swapped() -> None:
    entries = record(LINK_WINDOW_ROWS + 10)
    moved = entries[3]
    with tampering() as cursor:
        cursor.execute(
            "UPDATE audit_entry SET created_at = %s WHERE id = %s",
            [entries[-1].created_at + timedelta(seconds=1), moved.pk],
        )
    report = dashboard_chain_verify()
    found = kinds(report)
    assert found[moved.pk] == {DamageKind.CONTENT_CHANGED, DamageKind.ROWS_SWAPPED}
    assert found[entries[4].pk] == {DamageKind.ROWS_SWAPPED}
    assert DamageKind.ROW_DELETED not in set().union(*found.values())


def test_it_lists_every_damaged_entry_in_chain_order() -> None:
    entries = record(8)
    with tampering() as cursor:
        cursor.execute("""UPDATE audit_entry SET actor_name = 'someone' WHERE id = %s""", [entries[1].pk])
        cursor.execute("DELETE FROM audit_entry WHERE id = %s", [entries[4].pk])
    report = dashboard_chain_verify()
    assert [(d.entry_id, d.kind) for d in report.damages] == [
        (entries[1].pk, DamageKind.CONTENT_CHANGED),
        (entries[5].pk, DamageKind.ROW_DELETED),
    ]
    assert report.damaged_entries == 2


def test_verifying_ten_thousand_entries_takes_constant_memory() -> None:
    filler = "x" * 1000
    at = datetime(2026, 1, 1, tzinfo=UTC)
    previous: str | None = None
    with connection.cursor() as cursor:
        columns = (
            "created_at, actor_name, action, environment, object_type, object_id,"
            " params, outcome, hash, previous_hash"
        )
        with cursor.connection.cursor().copy(f"COPY audit_entry ({columns}) FROM STDIN") as copy:
            for n in range(BIG_CHAIN_ENTRIES):
                entry = AuditEntry(
                    actor_name=SYSTEM_SCHEDULER,
                    action="locks.released",
                    environment="dev",
                    object_type="run",
                    object_id=str(n),
                    params={"filler": filler},
                    outcome={"released": str(n)},
                    created_at=at + timedelta(milliseconds=n),
                    previous_hash=previous,
                )
                entry.hash = entry_hash(**audit_entry_fields(entry))
                copy.write_row(
                    (
                        entry.created_at,
                        entry.actor_name,
                        entry.action,
                        entry.environment,
                        entry.object_type,
                        entry.object_id,
                        json.dumps(entry.params),
                        json.dumps(entry.outcome),
                        entry.hash,
                        previous,
                    )
                )
                previous = entry.hash

    tracemalloc.start()
    try:
        report = dashboard_chain_verify()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.intact and report.entries == BIG_CHAIN_ENTRIES
    assert report.head is not None and report.head.hash == previous
    assert peak < VERIFY_PEAK_BOUND_BYTES, f"verification peaked at {peak} bytes"


# --- The command -------------------------------------------------------------------------------


def run_command(*args: str) -> tuple[str, CommandError | None]:
    out = StringIO()
    try:
        call_command("verify_audit_chain", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


def test_the_command_prints_one_line_and_succeeds_when_the_chain_is_intact() -> None:
    entries = record(3)
    out, error = run_command("--dashboard")
    assert error is None
    assert out == f"dashboard audit chain intact: 3 entries; head #{entries[2].pk} {entries[2].hash}\n"


def test_the_command_lists_damaged_entries_and_fails() -> None:
    entries = record(4)
    with tampering() as cursor:
        cursor.execute("DELETE FROM audit_entry WHERE id = %s", [entries[1].pk])
    out, error = run_command("--dashboard")
    assert error is not None and error.returncode == 1
    assert out.startswith(f"entry #{entries[2].pk}: row deleted - ")
    assert f"first broken entry #{entries[2].pk}" in str(error)
    assert f"last verified head #{entries[0].pk} {entries[0].hash}" in str(error)


def test_the_command_needs_one_chain_and_a_known_environment() -> None:
    with pytest.raises(CommandError):
        call_command("verify_audit_chain")
    _out, error = run_command("--env", "nowhere")
    assert error is not None and error.returncode == 2 and "known:" in str(error)


@pytest.mark.django_db(transaction=True)
def test_the_command_exits_zero_when_intact_and_non_zero_when_damaged(worker_environ: dict[str, str]) -> None:
    entries = record(3)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", "verify_audit_chain", "--dashboard"],
            cwd=BASE_DIR,
            env=worker_environ,
            capture_output=True,
            text=True,
            timeout=60,
        )

    intact = run()
    assert intact.returncode == 0, intact.stderr
    assert "intact: 3 entries" in intact.stdout
    with tampering() as cursor:
        cursor.execute("""UPDATE audit_entry SET outcome = '{"ok": "true"}' WHERE id = %s""", [entries[1].pk])
    damaged = run()
    assert damaged.returncode == 1
    assert f"entry #{entries[1].pk}: content changed" in damaged.stdout
    assert "DAMAGED" in damaged.stderr


# --- Browsing and export -----------------------------------------------------------------------


def test_the_selector_filters_entries_newest_first() -> None:
    operator = make_user("operator1", "Operator")
    a = audit_record(
        actor=operator, action="job.requested", environment="dev", object_type="job", object_id=1
    )
    b = audit_record(actor=operator, action="job.approved", environment="dev", object_type="job", object_id=1)
    c = audit_record(actor=SYSTEM_SCHEDULER, action="locks.released", environment="test")
    assert list(audit_entries()) == [c, b, a]
    assert list(audit_entries(action_prefix="job.")) == [b, a]
    assert list(audit_entries(action="job.requested")) == [a]
    assert list(audit_entries(environment="test")) == [c]
    assert list(audit_entries(actor_name="operator1", object_type="job", object_id="1")) == [b, a]
    assert list(audit_entries(since=b.created_at)) == [c, b]
    assert list(audit_entries(until=b.created_at)) == [a]


def test_the_csv_export_escapes_cells_a_spreadsheet_would_run_as_formulas() -> None:
    audit_record(
        actor=SYSTEM_SCHEDULER,
        action="locks.released",
        environment="dev",
        object_type="run",
        object_id='=HYPERLINK("http://evil")',
        params={"note": "=1+1"},
    )
    lines = audit_csv(AuditEntry.objects.all()).splitlines()
    assert (
        lines[0]
        == "id,created_at,actor,action,environment,object_type,object_id,params,outcome,hash,previous_hash"
    )
    assert "'=HYPERLINK" in lines[1]
    assert '{""note"": ""=1+1""}' in lines[1]  # JSON cells start with "{": never a formula


# --- An environment's audit_logs (--env) ------------------------------------------------------------


ENV_AUDIT_INSERT = """
    INSERT INTO public.audit_logs (action, record_id, old_data, new_data, hash, previous_hash, created_at)
    VALUES ('upsert_missing_lines', %s, NULL, %s, %s, %s, %s) RETURNING id
"""


def env_chain(env: Environment, rows: list[tuple[bool, datetime]]) -> list[tuple[int, str]]:
    """Write a chained audit_logs: (ours, created_at) per row; ours recompute, others use a
    formula of their own. Returns (id, hash) in chain order."""
    written: list[tuple[int, str]] = []
    previous: str | None = None
    with connections[env.alias].cursor() as cursor:
        for n, (ours, at) in enumerate(rows):
            new_data: dict[str, Any] = {"run_id": "r1", "operation": "insert", "amount": f"{n}.50"}
            if ours:
                new_data["hash_scheme"] = HASH_SCHEME
                digest = entry_hash(
                    action="upsert_missing_lines",
                    record_id=f"line-{n}",
                    old_data=None,
                    new_data=new_data,
                    created_at=at,
                    previous_hash=previous,
                )
            else:
                digest = hashlib.sha256(f"{previous}|{n}".encode()).hexdigest()
            cursor.execute(
                ENV_AUDIT_INSERT,
                [f"line-{n}", json.dumps(new_data), digest, previous, at],
            )
            written.append((int(cursor.fetchone()[0]), digest))
            previous = digest
    return written


ENV_START = datetime(2026, 2, 8, 14, 0, tzinfo=UTC)


@pytest.mark.django_db(databases="__all__")
def test_an_environments_chain_of_several_writers_verifies(
    unprotected_env: Environment, clean_environments: None
) -> None:
    rows = env_chain(unprotected_env, [(n % 3 != 0, ENV_START + timedelta(seconds=n)) for n in range(9)])
    report = environment_chain_verify(env=unprotected_env)
    assert report.intact and report.entries == 9 and report.recomputed == 6 and report.linkage_only == 3
    assert report.head is not None and report.head.entry_id == rows[-1][0]
    out, error = run_command("--env", unprotected_env.key)
    assert error is None
    assert out.startswith(
        f"environment {unprotected_env.key} audit chain intact: 9 entries (6 recomputed, 3 of other"
    )


@pytest.mark.django_db(databases="__all__")
def test_an_environments_damage_is_found_by_linkage_and_by_our_hashes(
    unprotected_env: Environment, clean_environments: None
) -> None:
    # Rows 2 and 3 are another writer's: only their order betrays a swap.
    rows = env_chain(
        unprotected_env, [(n not in (2, 3), ENV_START + timedelta(seconds=n)) for n in range(10)]
    )
    ids = [row_id for row_id, _ in rows]
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute(
            "UPDATE public.audit_logs SET created_at = CASE id WHEN %s THEN %s ELSE %s END"
            " WHERE id = ANY(%s)",
            [ids[2], ENV_START + timedelta(seconds=3), ENV_START + timedelta(seconds=2), [ids[2], ids[3]]],
        )
        cursor.execute(
            """UPDATE public.audit_logs SET new_data = new_data || '{"amount": "0.01"}' WHERE id = %s""",
            [ids[5]],
        )
        cursor.execute("DELETE FROM public.audit_logs WHERE id = %s", [ids[7]])
    report = environment_chain_verify(env=unprotected_env)
    assert kinds(report) == {
        ids[2]: {DamageKind.ROWS_SWAPPED},
        ids[3]: {DamageKind.ROWS_SWAPPED},
        ids[5]: {DamageKind.CONTENT_CHANGED},
        ids[8]: {DamageKind.ROW_DELETED},
    }
    assert report.first_broken is not None and report.first_broken.entry_id == ids[3]
    assert report.verified_head is not None and report.verified_head.entry_id == ids[1]
    out, error = run_command("--env", unprotected_env.key)
    assert error is not None and error.returncode == 1
    assert f"entry #{ids[5]}: content changed" in out


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_every_operator_action_lands_in_the_trail_and_it_verifies(
    unprotected_env: Environment, clean_environments: None, inline_jobs: None, client: Any
) -> None:
    from billing_ops import services
    from locks import release, schedule
    from tests.factories import make_locks, make_run

    operator = make_user("operator1", "Operator")
    approver = make_user("approver1", "Approver")
    make_run(unprotected_env, 1)
    make_locks(unprotected_env, 1, 5)
    plan = release.release_plan_prepare(actor=operator, env=unprotected_env, run_ids=[1], system_only=False)
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    services.job_execute(job_id=job.pk, worker="test")
    restore = release.restore_request(actor=approver, release_job_id=job.pk)
    services.job_execute(job_id=restore.pk, worker="test")
    check = services.job_request(actor=operator, kind="environment_check", environment=unprotected_env.key)
    services.job_cancel(actor=operator, job_id=check.pk)
    schedule.cleanup_schedule_set(
        actor=approver, minute="15", hour="3", day_of_week="*", time_zone="UTC", enabled=True
    )
    client.post("/login/", {"username": "operator1", "password": "wrong"})

    actions = list(AuditEntry.objects.order_by("created_at").values_list("action", flat=True))
    for expected in (
        "job.requested",
        "job.finished",
        "locks.released",
        "locks.restored",
        "job.cancelled",
        "schedule.changed",
        "auth.login_failed",
    ):
        assert expected in actions, expected
    released = AuditEntry.objects.get(action="locks.released")
    assert released.outcome["released"] == "5" and released.params["plan_id"] == str(plan.pk)
    assert released.outcome["released_rows_digest"] == release.released_rows_digest(plan.pk)
    failed = AuditEntry.objects.get(action="auth.login_failed")
    assert failed.params["username"] == "operator1" and "wrong" not in json.dumps(failed.params)
    assert dashboard_chain_verify().intact
