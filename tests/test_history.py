"""Lock snapshots: their figures against the seed report's SQL, the change since the
previous one, the series, the chart, retention and the beat task."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import connections
from django.utils import timezone

from billing_ops.celery import app as celery_app
from billing_ops.environments import Environment, all_environments
from locks.charts import stuck_locks_svg
from locks.history import latest_snapshots, stuck_locks_series
from locks.models import LockSnapshot
from locks.services import SNAPSHOT_RETENTION_DAYS, snapshots_prune, snapshots_take
from tests.conftest import free_port_for_tests

# The seed report's own query (seeds/billing-run-lock-analysis.md), verbatim.
SEED_REPORT_SQL = """
SELECT
    b.id AS billing_run_id,
    b.billing_number,
    b.status::text AS status,
    b.create_date,
    b.modify_date,
    COUNT(l.id) AS lock_count,
    STRING_AGG(DISTINCT l.entity_type, ', ' ORDER BY l.entity_type) AS locked_entity_types
FROM billing.billings b
INNER JOIN lock.locks l ON l.billing_id = b.id
WHERE b.status::text = 'COMPLETED'
GROUP BY b.id, b.billing_number, b.status, b.create_date, b.modify_date
ORDER BY b.id DESC
"""
SVG = "{http://www.w3.org/2000/svg}"

# Snapshots read environments on connections of their own: what a test writes there must be
# committed, and clean_environments' TRUNCATE must not sit in an open test transaction.
in_environments = pytest.mark.django_db(databases="__all__", transaction=True)


# --- Writing environment data with plain SQL (also used by test_alerts) ---------------------


def add_run(
    env: Environment,
    run_id: int,
    *,
    status: str = "COMPLETED",
    stage: str = "ACCOUNTING",
    modified_ago: timedelta = timedelta(hours=1),
) -> None:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing.billings "
            "       (id, billing_number, status, process_stage, create_date, modify_date) "
            "VALUES (%(id)s, %(number)s, %(status)s::billing.billing_status, %(stage)s, "
            "        (now() AT TIME ZONE %(tz)s) - %(ago)s - interval '20 seconds', "
            "        (now() AT TIME ZONE %(tz)s) - %(ago)s)",
            {
                "id": run_id,
                "number": f"BILLING2025122200{run_id:02d}",
                "status": status,
                "stage": stage,
                "tz": env.time_zone,
                "ago": modified_ago,
            },
        )


def add_locks(
    env: Environment,
    billing_id: int | None,
    count: int,
    *,
    created_ago: timedelta = timedelta(hours=1),
    system: bool = True,
) -> None:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO lock.locks "
            "       (id, lock_key, entity_type, entity_id, billing_id, system_lock, create_date) "
            "SELECT gen_random_uuid()::text, t.entity_type || ':' || g, t.entity_type, g::text, "
            "       %(billing_id)s, %(system)s, (now() AT TIME ZONE %(tz)s) - %(ago)s "
            "FROM generate_series(1, %(n)s) g, "
            "     LATERAL (SELECT (ARRAY['customers', 'points-of-delivery', 'vat-rates'])[1 + g %% 3]"
            "              AS entity_type) t",
            {"billing_id": billing_id, "system": system, "tz": env.time_zone, "ago": created_ago, "n": count},
        )


def delete_locks(env: Environment, billing_id: int | None = None) -> None:
    with connections[env.alias].cursor() as cursor:
        if billing_id is None:
            cursor.execute("DELETE FROM lock.locks")
        else:
            cursor.execute("DELETE FROM lock.locks WHERE billing_id = %s", [billing_id])


def scalar(env: Environment, sql: str) -> Any:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def report(env: Environment) -> list[tuple[Any, ...]]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(SEED_REPORT_SQL)
        return cursor.fetchall()


def seed_the_story(env: Environment) -> None:
    """A small environment with one of everything the figures count."""
    add_run(env, 1)
    add_locks(env, 1, 5, created_ago=timedelta(days=3))
    add_run(env, 2)
    add_locks(env, 2, 3)
    add_run(env, 3)  # COMPLETED, released its locks
    add_run(env, 4, stage="DRAFT")  # COMPLETED but never made real, and holding locks
    add_locks(env, 4, 2)
    add_run(env, 5, status="IN_PROGRESS_ACCOUNTING", modified_ago=timedelta(hours=5))  # stale
    add_locks(env, 5, 4)
    add_run(env, 6, status="IN_PROGRESS_ACCOUNTING", modified_ago=timedelta(minutes=10))  # running
    add_locks(env, 6, 7)
    add_run(env, 7, status="GENERATED")  # the error path, locks left behind
    add_locks(env, 7, 2)
    add_locks(env, None, 6, system=False)  # user locks, no run


# --- Snapshots ----------------------------------------------------------------------------


@in_environments
def test_a_snapshot_records_the_seed_reports_figures(unprotected_env, clean_environments) -> None:
    env = unprotected_env
    seed_the_story(env)
    before = timezone.now()

    snapshots = {s.environment: s for s in snapshots_take()}

    seed = report(env)
    snapshot = LockSnapshot.objects.get(pk=snapshots[env.key].pk)
    assert snapshot.reachable and snapshot.error == ""
    assert snapshot.completed_with_locks == len(seed) == 3
    assert snapshot.stuck_locks == sum(row[5] for row in seed) == 10
    assert snapshot.total_runs == scalar(env, "SELECT count(*) FROM billing.billings") == 7
    assert snapshot.completed_runs == scalar(
        env, "SELECT count(*) FROM billing.billings WHERE status::text = 'COMPLETED'"
    )
    assert snapshot.total_locks == scalar(env, "SELECT count(*) FROM lock.locks") == 29
    assert snapshot.locks_without_billing == scalar(
        env, "SELECT count(*) FROM lock.locks WHERE billing_id IS NULL"
    )
    assert (snapshot.stale_runs, snapshot.stale_runs_locks) == (1, 4)
    assert snapshot.error_path_runs_with_locks == 1
    assert snapshot.unreal_completed_runs == 1
    assert snapshot.oldest_stuck_lock_at is not None
    assert abs(snapshot.oldest_stuck_lock_at - (before - timedelta(days=3))) < timedelta(minutes=1)
    definition = scalar(env, "SELECT pg_get_functiondef('billing_run.make_billing_run_real'::regproc)")
    assert snapshot.procedure_deletes_locks == ("DELETE FROM lock.locks" in definition)
    assert snapshot.verdict == "red"

    # One row per configured environment, all from the same round; the empty ones are clean.
    assert set(snapshots) == {e.key for e in all_environments()}
    assert len({s.taken_at for s in snapshots.values()}) == 1
    for key, other in snapshots.items():
        if key != env.key:
            assert other.reachable and other.stuck_locks == 0 and other.total_runs == 0


@in_environments
def test_an_unreachable_environment_is_recorded_with_its_error(clean_environments, extra_environment) -> None:
    down = extra_environment("down", f"postgresql://x:secret-pw@127.0.0.1:{free_port_for_tests()}/phoenix")

    snapshots = {s.environment: s for s in snapshots_take()}

    snapshot = LockSnapshot.objects.get(pk=snapshots[down.key].pk)
    assert snapshot.reachable is False and snapshot.verdict == "red"
    assert "refused" in snapshot.error.lower() and "secret-pw" not in snapshot.error
    assert snapshot.stuck_locks is None and snapshot.total_runs is None
    assert snapshot.procedure_deletes_locks is None
    assert all(s.reachable for key, s in snapshots.items() if key != down.key)


@in_environments
def test_latest_snapshots_show_the_change_since_the_previous_one(
    unprotected_env, protected_env, clean_environments
) -> None:
    env = unprotected_env
    seed_the_story(env)
    first = {s.environment: s for s in snapshots_take()}
    delete_locks(env, billing_id=1)  # an operator released run 1's five locks
    second = {s.environment: s for s in snapshots_take()}

    latest = latest_snapshots()

    assert list(latest) == [e.key for e in all_environments()]
    change = latest[env.key]
    assert (change.latest.pk, change.previous.pk) == (second[env.key].pk, first[env.key].pk)
    assert change.stuck_locks_change == -5
    assert change.completed_with_locks_change == -1
    assert change.total_locks_change == -5
    assert change.stale_runs_change == 0
    assert latest[protected_env.key].stuck_locks_change == 0


@pytest.mark.django_db
def test_the_first_snapshot_has_no_previous_and_unknown_environments_are_absent() -> None:
    LockSnapshot.objects.create(environment="test", reachable=True, verdict="green", stuck_locks=0)

    latest = latest_snapshots(["test", "nowhere"])

    assert list(latest) == ["test"]
    assert latest["test"].previous is None
    assert latest["test"].stuck_locks_change is None


@pytest.mark.django_db
def test_a_change_against_an_unreachable_round_is_unknown() -> None:
    now = timezone.now()
    LockSnapshot.objects.create(
        environment="test", taken_at=now - timedelta(minutes=15), reachable=True, verdict="red", stuck_locks=9
    )
    LockSnapshot.objects.create(
        environment="test", taken_at=now, reachable=False, verdict="red", error="down"
    )

    change = latest_snapshots(["test"])["test"]

    assert change.latest.reachable is False
    assert change.stuck_locks_change is None


@pytest.mark.django_db
def test_the_series_is_oldest_first_since_the_given_time_and_skips_unreachable_rounds() -> None:
    now = timezone.now()

    def snap(key: str, minutes_ago: int, stuck: int | None) -> None:
        LockSnapshot.objects.create(
            environment=key,
            taken_at=now - timedelta(minutes=minutes_ago),
            reachable=stuck is not None,
            verdict="red",
            stuck_locks=stuck,
        )

    snap("test", 120, 1)  # before `since`
    snap("test", 45, 10)
    snap("test", 30, None)  # unreachable
    snap("test", 15, 12)
    snap("test", 0, 7)
    snap("dev", 15, 999)  # another environment

    series = stuck_locks_series("test", now - timedelta(hours=1))

    assert series == [
        (now - timedelta(minutes=45), 10),
        (now - timedelta(minutes=15), 12),
        (now, 7),
    ]


@pytest.mark.django_db
def test_snapshots_past_their_retention_are_deleted() -> None:
    now = timezone.now()
    old = LockSnapshot.objects.create(
        environment="test",
        taken_at=now - timedelta(days=SNAPSHOT_RETENTION_DAYS + 1),
        reachable=True,
        verdict="green",
    )
    kept = LockSnapshot.objects.create(
        environment="test",
        taken_at=now - timedelta(days=SNAPSHOT_RETENTION_DAYS - 1),
        reachable=True,
        verdict="green",
    )

    assert snapshots_prune() == 1

    assert not LockSnapshot.objects.filter(pk=old.pk).exists()
    assert LockSnapshot.objects.filter(pk=kept.pk).exists()


def test_beat_runs_the_monitor_every_snapshot_interval() -> None:
    entry = settings.CELERY_BEAT_SCHEDULE["snapshot-environments"]
    assert entry["task"] == "locks.tasks.snapshot_environments"
    assert entry["schedule"] == float(settings.SNAPSHOT_INTERVAL_S)
    celery_app.loader.import_default_modules()
    assert entry["task"] in celery_app.tasks


# --- The chart ------------------------------------------------------------------------------


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # noqa: S314 - our own output; also proves it is well-formed
    assert root.tag == f"{SVG}svg"
    assert "<script" not in svg and "href" not in svg
    return root


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_the_chart_says_so_when_there_are_no_snapshots() -> None:
    root = parse(stuck_locks_svg([]))
    assert texts(root) == ["No snapshots yet"]
    assert root.find(f"{SVG}circle") is None


def test_the_chart_of_a_single_snapshot_is_a_dot_with_its_time() -> None:
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    root = parse(stuck_locks_svg([(at, 1_291)], width=300, height=120))
    assert root.get("width") == "300" and root.get("height") == "120"
    assert root.find(f"{SVG}polyline") is None
    circles = root.findall(f"{SVG}circle")
    assert len(circles) == 1
    assert "1,291" in texts(root)
    assert any("2026-03-01" in t for t in texts(root))
    assert "1,291 stuck locks" in circles[0].find(f"{SVG}title").text


def test_the_chart_draws_the_series_with_its_maximum_and_its_ends() -> None:
    start = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    values = [0, 5, 202_850, 1_358, 1_291]
    series = [(start + timedelta(minutes=15 * i), v) for i, v in enumerate(values)]

    root = parse(stuck_locks_svg(series))

    line = root.find(f"{SVG}polyline")
    points = [tuple(map(float, p.split(","))) for p in line.get("points").split()]
    assert len(points) == len(values)
    assert points == sorted(points, key=lambda p: p[0])  # left to right in time
    highest = min(points, key=lambda p: p[1])  # SVG's y grows downwards
    assert highest == points[2]
    assert root.find(f"{SVG}polygon") is not None  # the area
    labels = texts(root)
    assert "202,850" in labels and "0" in labels
    assert any("2026-03-01 00:00" in t for t in labels) and any("2026-03-01 01:00" in t for t in labels)
    dot = root.find(f"{SVG}circle")
    assert (float(dot.get("cx")), float(dot.get("cy"))) == pytest.approx(points[-1], abs=0.1)


def test_a_long_series_is_thinned_without_losing_its_peak() -> None:
    start = timezone.now() - timedelta(days=90)
    series = [(start + timedelta(minutes=15 * i), i % 50) for i in range(90 * 96)]
    series[4321] = (series[4321][0], 1_000_000)

    svg = stuck_locks_svg(series, width=400)

    points = parse(svg).find(f"{SVG}polyline").get("points").split()
    assert len(points) <= 400
    assert "1,000,000" in texts(parse(svg))
    assert len(svg) < 40_000
