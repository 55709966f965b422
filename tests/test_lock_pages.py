"""The stuck-lock monitor's pages and selectors against data shapes the demo does not have."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.db import connections
from django.test.utils import CaptureQueriesContext

from billing_ops.contract import contract_schema_apply
from locks import selectors
from locks.selectors import STUCK_RUNS_SQL, RunFilters
from tests.factories import make_locks, make_run

# The overview reads each environment on a connection of its own, which sees only committed
# rows: these tests commit their data (and clean_environments empties it again).
pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def seed_report(env) -> list[tuple]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(STUCK_RUNS_SQL)
        return cursor.fetchall()


def counts(env) -> dict[str, int]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "SELECT (SELECT count(*) FROM billing.billings),"
            " (SELECT count(*) FROM billing.billings WHERE status::text = 'COMPLETED'),"
            " (SELECT count(*) FROM lock.locks), (SELECT count(*) FROM lock.locks WHERE billing_id IS NULL)"
        )
        total_runs, completed, locks, orphans = cursor.fetchone()
    return {"total_runs": total_runs, "completed_runs": completed, "total_locks": locks, "orphans": orphans}


@pytest.fixture
def shaped(unprotected_env, clean_environments):
    """Runs in every state, a run with thousands of mixed locks, and orphan locks."""
    env = unprotected_env
    make_run(env, 1620, stage="DRAFT", number="BILLING202512220055")
    make_locks(env, 1620, 3000, system=True)
    make_locks(env, 1620, 250, system=False, entity_type="customers")
    make_run(env, 1700, created=datetime(2026, 1, 5, 8, 0))
    make_locks(env, 1700, 3, entity_type="vat-rates")
    make_run(env, 1701)  # COMPLETED, no locks: not stuck
    make_run(env, 1800, status="GENERATED", stage="DRAFT")
    make_locks(env, 1800, 5)
    old = datetime.utcnow() - timedelta(days=3)
    make_run(env, 1900, status="IN_PROGRESS_ACCOUNTING", created=old, modified=old)
    make_locks(env, 1900, 7)
    now = datetime.utcnow()
    make_run(env, 1901, status="IN_PROGRESS_ACCOUNTING", created=now, modified=now)  # running, fine
    make_locks(env, 1901, 11)
    make_locks(env, None, 20, system=False, entity_type="customers")
    return env


def test_the_figures_equal_the_seed_reports_query(shaped) -> None:
    figures = selectors.lock_figures(shaped)
    report = seed_report(shaped)
    plain = counts(shaped)
    assert figures.total_runs == plain["total_runs"] == 6
    assert figures.completed_runs == plain["completed_runs"] == 3
    assert figures.completed_with_locks == len(report) == 2
    assert figures.stuck_locks == sum(row[6] for row in report) == 3253
    assert figures.total_locks == plain["total_locks"] == 3253 + 5 + 7 + 11 + 20
    assert figures.locks_without_billing == plain["orphans"] == 20
    assert figures.stale_runs == 1 and figures.stale_runs_locks == 7
    assert figures.error_path_runs_with_locks == 1
    assert figures.unreal_completed_runs == 1
    assert figures.oldest_stuck_lock_at is not None


def test_an_empty_environment_is_green_with_zeros(unprotected_env, clean_environments) -> None:
    figures = selectors.lock_figures(unprotected_env)
    assert (figures.total_runs, figures.total_locks, figures.completed_with_locks) == (0, 0, 0)
    assert figures.oldest_stuck_lock_at is None
    assert selectors.verdict_for(figures).colour == "green"


def test_the_stuck_runs_list_is_exactly_the_seed_reports_rows(shaped) -> None:
    rows = selectors.stuck_runs(shaped)
    report = seed_report(shaped)
    assert [
        (r["billing_run_id"], r["billing_number"], r["status"], r["lock_count"], r["locked_entity_types"])
        for r in rows
    ] == [(row[0], row[1], row[2], row[6], row[7]) for row in report]
    assert rows[1]["process_stage"] == "DRAFT" and rows[1]["system_locks"] == 3000


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (RunFilters(entity_type="vat-rates"), {1620: 750, 1700: 3}),
        (RunFilters(system_lock=False), {1620: 250}),
        (RunFilters(system_lock=True, entity_type="customers"), {1620: 750}),
        (RunFilters(min_locks=4), {1620: 3250}),
        (RunFilters(created_from=datetime(2026, 1, 1).date()), {1700: 3}),
        (RunFilters(created_to=datetime(2025, 12, 22).date()), {1620: 3250}),
    ],
)
def test_stuck_run_filters_narrow_runs_and_their_counted_locks(shaped, filters, expected) -> None:
    assert {r["billing_run_id"]: r["lock_count"] for r in selectors.stuck_runs(shaped, filters)} == expected


def test_the_stuck_runs_page_keeps_its_filters_in_the_url(shaped, client_for, viewer) -> None:
    response = client_for(viewer).get(
        f"/environments/{shaped.key}/stuck-runs/?lock_kind=user&sort=-lock_count"
    )
    assert response.status_code == 200
    rows = list(response.context["table"].rows)
    assert [row.record["billing_run_id"] for row in rows] == [1620]
    assert response.context["lock_count"] == 250
    page = response.content.decode()
    assert "BILLING202512220055" in page and "lock_kind=user" in page  # sort links keep the filter


def test_an_invalid_filter_value_is_ignored_not_a_500(shaped, client_for, viewer) -> None:
    response = client_for(viewer).get(
        f"/environments/{shaped.key}/stuck-runs/?min_locks=abc&entity_type=nope"
    )
    assert response.status_code == 200
    assert len(response.context["table"].rows) == 2
    assert "invalid" in response.content.decode()


def test_the_suspicious_runs_are_listed_apart_and_explained(shaped, client_for, viewer) -> None:
    response = client_for(viewer).get(f"/environments/{shaped.key}/suspicious-runs/")
    tables = response.context["tables"]
    assert [r.record["billing_run_id"] for r in tables["error"].rows] == [1800]
    assert [r.record["billing_run_id"] for r in tables["stale"].rows] == [1900]
    assert [r.record["billing_run_id"] for r in tables["unreal"].rows] == [1620]
    assert "likely died" in response.content.decode()


def test_error_path_statuses_come_from_the_enum() -> None:
    labels = ["DRAFT", "GENERATED", "COMPLETED", "FAILED_ACCOUNTING", "ERROR", "CANCELLED", "ON_HOLD"]
    assert selectors.error_path_statuses(labels) == ["GENERATED", "FAILED_ACCOUNTING", "ERROR", "CANCELLED"]


def test_the_drill_down_groups_locks_and_pages_without_counting(shaped, client_for, viewer) -> None:
    with CaptureQueriesContext(connections[shaped.alias]) as queries:
        response = client_for(viewer).get(f"/environments/{shaped.key}/runs/1620/?page=2")
    assert response.status_code == 200
    summary = response.context["summary"]
    assert (summary.total, summary.system, summary.user) == (3250, 3000, 250)
    assert {(g.entity_type, g.system_lock): g.count for g in summary.groups}[("customers", False)] == 250
    assert len(response.context["table"].page.object_list) == 100
    assert not [
        q
        for q in queries.captured_queries
        if "COUNT(*)" in q["sql"].upper() and "GROUP BY" not in q["sql"].upper()
    ]
    page = response.content.decode()
    assert "COMPLETED but still holds locks" in page and "no index on billing_id" in page


def test_the_drill_down_of_an_unknown_run_is_a_404(shaped, client_for, viewer) -> None:
    assert client_for(viewer).get(f"/environments/{shaped.key}/runs/999999/").status_code == 404


def test_a_running_run_is_not_called_a_problem(shaped, client_for, viewer) -> None:
    response = client_for(viewer).get(f"/environments/{shaped.key}/runs/1901/")
    assert response.context["problem"] == ""


def test_locks_without_a_run_are_kept_apart(shaped, client_for, viewer) -> None:
    response = client_for(viewer).get(f"/environments/{shaped.key}/locks-without-run/")
    groups = response.context["groups"]
    assert [(g.entity_type, g.system_lock, g.count) for g in groups] == [("customers", False, 20)]
    assert all(row.record.billing_id is None for row in response.context["table"].rows)


def test_a_holder_column_is_used_when_the_platform_has_one(shaped) -> None:
    with connections[shaped.alias].cursor() as cursor:
        cursor.execute("ALTER TABLE lock.locks ADD COLUMN locked_by text")
        cursor.execute("UPDATE lock.locks SET locked_by = 'alice' WHERE billing_id IS NULL")
    try:
        groups, shape = selectors.locks_without_run(shaped)
        assert shape.holder_column == "locked_by" and groups[0].holder == "alice"
    finally:
        with connections[shaped.alias].cursor() as cursor:
            cursor.execute("ALTER TABLE lock.locks DROP COLUMN locked_by")


@pytest.fixture
def restore_procedure(unprotected_env):
    """These tests commit a different procedure; put the contract's back afterwards."""
    yield
    contract_schema_apply(unprotected_env)


@pytest.mark.parametrize(
    ("body", "verdict"),
    [
        ("DELETE FROM lock.locks WHERE billing_id = p_billing_id;", "deletes locks"),
        ("-- DELETE FROM lock.locks WHERE billing_id = p_billing_id;\n NULL;", "does not delete locks"),
        (
            "/* DELETE FROM lock.locks */ UPDATE billing.billings SET process_stage = 'X';",
            "does not delete locks",
        ),
        ('DELETE  FROM  "lock"."locks" l WHERE l.billing_id = p_billing_id;', "deletes locks"),
    ],
)
def test_procedure_health_reads_the_body(unprotected_env, restore_procedure, body, verdict) -> None:
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute(
            "CREATE OR REPLACE PROCEDURE billing_run.make_billing_run_real(p_billing_id bigint) "
            f"LANGUAGE plpgsql AS $$ BEGIN {body} END $$"
        )
    assert selectors.procedure_health(unprotected_env).verdict == verdict


def test_a_missing_procedure_is_reported(unprotected_env, restore_procedure) -> None:
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute("DROP PROCEDURE billing_run.make_billing_run_real(bigint)")
    health = selectors.procedure_health(unprotected_env)
    assert not health.exists and health.verdict == "missing"


def test_the_overview_shows_every_environment_with_a_verdict(shaped, client_for, viewer) -> None:
    response = client_for(viewer).get("/")
    assert response.status_code == 200
    rows = {row.status.env.key: row.status for row in response.context["rows"]}
    assert rows[shaped.key].verdict.colour == "red"
    page = response.content.decode()
    assert f'data-env="{shaped.key}" data-verdict="red"' in page
    assert "2 COMPLETED run(s) still hold 3,253 lock(s)" in page


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_unknown_enum_labels_and_extra_columns_change_nothing(unprotected_env, clean_environments) -> None:
    env = unprotected_env
    with connections[env.alias].cursor() as cursor:
        cursor.execute("ALTER TYPE billing.billing_status ADD VALUE IF NOT EXISTS 'ROLLED_BACK_SOMEHOW'")
        cursor.execute("ALTER TABLE billing.billings ADD COLUMN IF NOT EXISTS tenant text DEFAULT 't1'")
        cursor.execute("ALTER TABLE lock.locks ADD COLUMN IF NOT EXISTS note jsonb")
    try:
        make_run(env, 1, status="ROLLED_BACK_SOMEHOW")
        make_locks(env, 1, 4)
        make_run(env, 2)
        make_locks(env, 2, 2)
        figures = selectors.lock_figures(env)
        assert "ROLLED_BACK_SOMEHOW" in figures.statuses
        assert figures.completed_with_locks == 1 and figures.total_locks == 6
        assert [r["billing_run_id"] for r in selectors.stuck_runs(env)] == [2]
    finally:
        with connections[env.alias].cursor() as cursor:
            cursor.execute("ALTER TABLE billing.billings DROP COLUMN IF EXISTS tenant")
            cursor.execute("ALTER TABLE lock.locks DROP COLUMN IF EXISTS note")


@pytest.mark.parametrize(
    ("fmt", "marker"),
    [("md", "# Billing Run Lock Analysis"), ("csv", "billing_run_id"), ("json", '"environments"')],
)
def test_the_report_downloads_in_each_format(shaped, client_for, viewer, fmt, marker) -> None:
    response = client_for(viewer).get(f"/report.{fmt}")
    assert response.status_code == 200
    assert "attachment" in response["Content-Disposition"]
    body = response.content.decode()
    assert marker in body and "BILLING202512220055" in body


def test_metrics_need_the_token_when_one_is_configured(shaped, settings, client_for, viewer) -> None:
    from django.test import Client

    settings.METRICS_TOKEN = "s3cret-token"
    assert Client().get("/metrics").status_code == 401
    assert client_for(viewer).get("/metrics").status_code == 401  # a session is not the token
    response = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert response.status_code == 200
    assert f'billing_ops_completed_runs_with_locks{{environment="{shaped.key}"' in response.content.decode()


def test_an_operator_acknowledges_an_alert_over_http(unprotected_env, client_for, operator, viewer) -> None:
    from locks.models import Alert

    alert = Alert.objects.create(
        environment=unprotected_env.key,
        kind="completed_with_locks",
        severity="critical",
        summary="Test: 6 COMPLETED runs still hold 1,358 locks",
    )
    page = client_for(viewer).get("/alerts/").content.decode()
    assert "1,358 locks" in page and "Acknowledge" not in page
    response = client_for(operator).post(f"/alerts/{alert.pk}/acknowledge/")
    assert response.status_code == 302
    alert.refresh_from_db()
    assert alert.status == "acknowledged" and alert.acknowledged_by == operator
    overview = client_for(viewer).get("/").content.decode()
    assert "(acknowledged)" in overview
