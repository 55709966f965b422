"""seed_demo: the demo tells the seed documents' story, exactly and the same way every time."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import connections

from audit.chain import entry_hash, is_ours
from billing_ops.demo import (
    DEMO_USERS,
    DEV_TOTAL_LOCKS,
    SEED_MARKER,
    demo_plan,
    demo_users_ensure,
    seed_environment,
)
from billing_ops.environments import Environment, get_environment

# The seed report's own query (seeds/billing-run-lock-analysis.md).
STUCK_RUNS_SQL = """
    SELECT b.id, b.billing_number, b.status::text, COUNT(l.id) AS lock_count,
           STRING_AGG(DISTINCT l.entity_type, ', ' ORDER BY l.entity_type)
      FROM billing.billings b
     INNER JOIN lock.locks l ON l.billing_id = b.id
     WHERE b.status::text = 'COMPLETED'
     GROUP BY b.id, b.billing_number, b.status
     ORDER BY b.id DESC
"""
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def rows(env_key: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connections[f"env_{env_key}"].cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@pytest.fixture
def seeded_test() -> Environment:
    env = get_environment("test")
    assert seed_environment(env, reset=True, now=NOW).outcome == "seeded"
    return env


@pytest.mark.django_db(databases=["env_test"])
def test_test_shows_six_completed_runs_holding_1358_locks(seeded_test) -> None:
    report = rows("test", STUCK_RUNS_SQL)
    assert len(report) == 6
    assert sum(r[3] for r in report) == 1_358
    assert {r[2] for r in report} == {"COMPLETED"}


@pytest.mark.django_db(databases=["env_test"])
def test_run_1620_is_the_one_the_analysis_describes(seeded_test) -> None:
    (run,) = rows(
        "test",
        "SELECT billing_number, status::text, process_stage, create_date, modify_date,"
        "       (SELECT count(*) FROM lock.locks WHERE billing_id = b.id),"
        "       (SELECT bool_and(system_lock) FROM lock.locks WHERE billing_id = b.id)"
        "  FROM billing.billings b WHERE id = 1620",
    )
    assert run == (
        "BILLING202512220055",
        "COMPLETED",
        "DRAFT",
        datetime(2025, 12, 22, 11, 2, 8),
        datetime(2025, 12, 22, 11, 2, 28),
        1_291,
        True,
    )


@pytest.mark.django_db(databases=["env_test"])
def test_test_has_20_user_locks_without_a_billing_run(seeded_test) -> None:
    ((count, system, types),) = rows(
        "test",
        "SELECT count(*), bool_or(system_lock), array_agg(DISTINCT entity_type ORDER BY entity_type)"
        "  FROM lock.locks WHERE billing_id IS NULL",
    )
    assert (count, system, types) == (20, False, ["customers", "energy-product-contracts"])


@pytest.mark.django_db(databases=["env_test"])
def test_lock_rows_follow_the_contract(seeded_test) -> None:
    ((bad_keys, types),) = rows(
        "test",
        "SELECT count(*) FILTER (WHERE lock_key <> entity_type || ':' || entity_id"
        "                           OR entity_id !~ '^[0-9]+$'),"
        "       array_agg(DISTINCT entity_type) FROM lock.locks",
    )
    assert bad_keys == 0
    assert len(types) == 11


@pytest.mark.django_db(databases=["env_test", "env_prod"])
def test_only_test_and_dev_get_the_procedure_that_forgets_the_locks(seeded_test) -> None:
    seed_environment(get_environment("prod"), reset=True, now=NOW)
    definition = "SELECT pg_get_functiondef('billing_run.make_billing_run_real'::regproc)"
    assert "DELETE FROM lock.locks" not in rows("test", definition)[0][0]
    assert "DELETE FROM lock.locks" in rows("prod", definition)[0][0]


@pytest.mark.django_db(databases=["env_prod"])
def test_production_holds_locks_only_for_runs_still_running() -> None:
    seed_environment(get_environment("prod"), reset=True, now=NOW)
    assert rows("prod", STUCK_RUNS_SQL) == []
    holders = rows(
        "prod",
        "SELECT b.status::text, max(b.modify_date) FROM billing.billings b"
        "  JOIN lock.locks l ON l.billing_id = b.id GROUP BY b.id, b.status",
    )
    assert len(holders) == 3
    assert {h[0] for h in holders} == {"IN_PROGRESS_ACCOUNTING"}
    assert all(NOW.replace(tzinfo=None) - h[1] < timedelta(minutes=15) for h in holders)


@pytest.mark.django_db(databases=["env_test"])
def test_the_audit_chain_links_and_our_rows_recompute(seeded_test) -> None:
    chain = rows(
        "test",
        "SELECT previous_hash, LAG(hash) OVER (ORDER BY created_at), action, record_id, old_data, new_data,"
        "       created_at, hash FROM audit_logs ORDER BY created_at",
    )
    assert chain[0][0] is None
    assert all(previous == expected for previous, expected, *_ in chain[1:])
    ours = 0
    for previous, _expected, action, record_id, old_data, new_data, created_at, digest in chain:
        new, old = json.loads(new_data), json.loads(old_data) if old_data else None
        if is_ours(new):
            ours += 1
            assert digest == entry_hash(
                action=action,
                record_id=record_id,
                old_data=old,
                new_data=new,
                created_at=created_at,
                previous_hash=previous,
            )
    assert ours == 43  # 40 inserts and 3 updates
    assert {r[2] for r in chain} == {"upsert_missing_lines", "invoice_adjusted"}


@pytest.mark.django_db(databases=["env_test"])
def test_the_runbooks_selective_undo_finds_the_runs_inserted_lines(seeded_test) -> None:
    ((found,),) = rows(
        "test",
        "SELECT count(*) FROM invoice_lines WHERE id IN (SELECT record_id::uuid FROM audit_logs"
        " WHERE action = 'upsert_missing_lines' AND new_data->>'operation' = 'insert')",
    )
    assert found == 40


@pytest.mark.django_db(databases=["env_test"])
def test_invoice_lines_are_normalized_and_free_of_duplicates(seeded_test) -> None:
    ((total, wrong, messy),) = rows(
        "test",
        r"SELECT count(*),"
        r"       count(*) FILTER (WHERE normalized_description"
        r"                        <> regexp_replace(lower(trim(description)), '\s+', ' ', 'g')),"
        r"       count(*) FILTER (WHERE normalized_description <> description)"
        r"  FROM invoice_lines",
    )
    assert (total, wrong) == (3_000, 0)
    assert messy > 0  # the normalization has something to do
    duplicates = rows(
        "test",
        "SELECT 1 FROM invoice_lines GROUP BY invoice_id, unit_id, line_type, normalized_description"
        " HAVING count(*) > 1",
    )
    assert duplicates == []


@pytest.mark.django_db(databases=["env_test"])
def test_a_second_run_changes_nothing_and_reset_rebuilds(seeded_test) -> None:
    with connections["env_test"].cursor() as cursor:
        cursor.execute("DELETE FROM lock.locks WHERE billing_id = 1620")  # an operator's cleanup
    again = seed_environment(seeded_test, now=NOW)
    assert again.outcome == "already seeded"
    assert again.locks == 1_378 - 1_291
    assert rows("test", "SELECT obj_description('billing'::regnamespace, 'pg_namespace')") == [(SEED_MARKER,)]
    rebuilt = seed_environment(seeded_test, reset=True, now=NOW)
    assert (rebuilt.outcome, rebuilt.locks, rebuilt.stuck_runs) == ("seeded", 1_378, 6)


def test_it_skips_an_environment_not_marked_demo() -> None:
    env = Environment(key="real", label="Real", url="postgresql://ops@db.invalid/phoenix", demo=False)
    assert seed_environment(env).outcome == "skipped"


def test_the_dev_plan_has_the_analysis_figures() -> None:
    plan = demo_plan(get_environment("dev"), now=NOW)
    stuck = [r for r in plan.runs if r.status == "COMPLETED" and r.lock_count]
    by_number = {r.billing_number: r.lock_count for r in stuck}
    assert len(stuck) == 178
    assert by_number["BILLING202511200006"] == 156_651
    assert by_number["BILLING202512020002"] == 44_431
    assert sum(by_number.values()) > 201_000
    assert (
        sum(r.lock_count for r in plan.runs) + sum(loose.count for loose in plan.loose_locks)
        == DEV_TOTAL_LOCKS
    )
    stale = [
        r
        for r in plan.runs
        if r.status == "IN_PROGRESS_ACCOUNTING" and NOW - r.modify_date > timedelta(days=1)
    ]
    assert len(stale) == 2
    assert len([r for r in plan.runs if r.status == "GENERATED" and r.lock_count]) == 3
    assert len({r.billing_number for r in plan.runs}) == len(plan.runs)


def test_the_history_is_the_same_every_time() -> None:
    def history(now: datetime) -> list[tuple[Any, ...]]:
        plan = demo_plan(get_environment("dev"), now=now)
        return [
            (r.id, r.billing_number, r.status, r.create_date, r.lock_count)
            for r in plan.runs
            if not r.status.startswith("IN_PROGRESS")
        ]

    assert history(NOW) == history(NOW + timedelta(days=3))


@pytest.mark.django_db
def test_it_creates_the_demo_users_with_their_roles_and_a_private_password_file(tmp_path) -> None:
    result = demo_users_ensure(var_dir=tmp_path)
    assert result.created == list(DEMO_USERS)
    path = tmp_path / "demo-users.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    accounts = json.loads(path.read_text())
    for role, groups in DEMO_USERS.items():
        user = User.objects.get(username=accounts[role]["username"])
        assert user.check_password(accounts[role]["password"])
        assert set(user.groups.values_list("name", flat=True)) == set(groups)
    assert set(User.objects.get(username="admin").groups.values_list("name", flat=True)) == {
        "Operator",
        "Approver",
    }


@pytest.mark.django_db
def test_it_keeps_the_passwords_and_resets_a_changed_one(tmp_path) -> None:
    demo_users_ensure(var_dir=tmp_path)
    before = json.loads((tmp_path / "demo-users.json").read_text())
    operator = User.objects.get(username="operator")
    operator.set_password("changed-by-someone")
    operator.save()
    result = demo_users_ensure(var_dir=tmp_path)
    assert (result.created, result.updated) == ([], ["operator"])
    assert json.loads((tmp_path / "demo-users.json").read_text()) == before
    operator.refresh_from_db()
    assert operator.check_password(before["operator"]["password"])


@pytest.mark.django_db(databases=["default", "env_test"])
def test_the_command_prints_one_line_per_environment(settings, tmp_path) -> None:
    settings.DEMO_MODE = False
    out = StringIO()
    call_command("seed_demo", "--env", "test", "--reset", stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("test (Test): seeded: 300 runs, 1,378 locks, 6 completed runs holding locks")
    assert lines[-1] == "demo users: skipped (BILLING_OPS_DEMO is off)"
    out = StringIO()
    call_command("seed_demo", "--env", "test", stdout=out)
    assert out.getvalue().startswith("test (Test): already seeded")
