"""The lock report export (JSON, CSV, markdown) and the lock_report command, on real data."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.core.management import CommandError, call_command
from django.db import connections

from billing_ops.contract import contract_schema_apply
from billing_ops.environments import Environment, all_environments
from locks import reports
from locks.reports import lock_report, render_csv, render_json, render_markdown
from locks.selectors import STUCK_RUNS_SQL
from tests.conftest import free_port_for_tests
from tests.factories import make_locks, make_run

# lock_report reads the figures on connections of its own, which see only committed rows:
# these tests commit their data (and clean_environments empties it again).
pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

GENERATED_AT = datetime(2026, 1, 24, 9, 30, tzinfo=UTC)
ENVIRONMENT_KEYS = [
    "key",
    "label",
    "host",
    "reachable",
    "error",
    "total_runs",
    "completed_runs",
    "completed_with_locks",
    "total_locks",
    "locks_without_billing",
    "stuck_runs",
]
RUN_KEYS = [
    "billing_run_id",
    "billing_number",
    "status",
    "process_stage",
    "create_date",
    "modify_date",
    "lock_count",
    "locked_entity_types",
]
PROCEDURE_WITHOUT_DELETE = """
CREATE OR REPLACE PROCEDURE billing_run.make_billing_run_real(p_billing_id bigint)
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE billing.billings SET process_stage = 'ACCOUNTING', modify_date = now() WHERE id = p_billing_id;
    -- DELETE FROM lock.locks WHERE billing_id = p_billing_id;  (commented out: deletes nothing)
END
$$
"""


# --- helpers -------------------------------------------------------------------------------


def seed_query(env: Environment) -> list[tuple]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(STUCK_RUNS_SQL)
        return cursor.fetchall()


def plain_counts(env: Environment) -> dict[str, int]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "SELECT (SELECT count(*) FROM billing.billings),"
            " (SELECT count(*) FROM billing.billings WHERE status::text = 'COMPLETED'),"
            " (SELECT count(DISTINCT b.id) FROM billing.billings b JOIN lock.locks l ON l.billing_id = b.id"
            "   WHERE b.status::text = 'COMPLETED'),"
            " (SELECT count(*) FROM lock.locks),"
            " (SELECT count(*) FROM lock.locks WHERE billing_id IS NULL)"
        )
        row = cursor.fetchone()
    return dict(zip(ENVIRONMENT_KEYS[5:10], row, strict=True))


def entity_types_of(env: Environment, run_id: int) -> list[str]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "SELECT array_agg(DISTINCT entity_type ORDER BY entity_type)"
            " FROM lock.locks WHERE billing_id = %s",
            [run_id],
        )
        return list(cursor.fetchone()[0])


def iso(env: Environment, value: datetime) -> str:
    """A platform timestamp (naive, in the environment's zone) as the report must write it."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=ZoneInfo(env.time_zone))
    return value.isoformat()


def expected_runs(env: Environment) -> list[dict]:
    """The seed query's rows, in the report's shape, with entity types counted separately."""
    return [
        {
            "billing_run_id": row[0],
            "billing_number": row[1],
            "status": row[2],
            "process_stage": row[3],
            "create_date": iso(env, row[4]),
            "modify_date": iso(env, row[5]),
            "lock_count": row[6],
            "locked_entity_types": entity_types_of(env, row[0]),
        }
        for row in seed_query(env)
    ]


def json_report(envs: list[Environment]) -> dict:
    return json.loads(render_json(lock_report(envs)))


def by_key(report: dict) -> dict[str, dict]:
    return {env["key"]: env for env in report["environments"]}


def down_environment(extra_environment) -> Environment:
    return extra_environment(
        "down", f"postgresql://nobody:secret-pw@127.0.0.1:{free_port_for_tests()}/phoenix", label="Down"
    )


@pytest.fixture
def empty_env(unprotected_env: Environment) -> Environment:
    return next(env for env in all_environments() if env.key != unprotected_env.key)


@pytest.fixture
def shaped(unprotected_env: Environment, clean_environments: None) -> Environment:
    """Runs in every state, a run with thousands of mixed system/user locks, locks without a
    run, and locks naming a run that does not exist."""
    env = unprotected_env
    make_run(env, 1620, stage="DRAFT", number="BILLING202512220055")
    make_locks(env, 1620, 3000, system=True)
    make_locks(env, 1620, 250, system=False, entity_type="customers")
    make_run(env, 1700, created=datetime(2026, 1, 5, 8, 0))
    make_locks(env, 1700, 3, entity_type="vat-rates")
    make_run(env, 1701)  # COMPLETED without locks: not stuck
    make_run(env, 1800, status="GENERATED", stage="DRAFT")
    make_locks(env, 1800, 5)
    old = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=3)
    make_run(env, 1900, status="IN_PROGRESS_ACCOUNTING", created=old, modified=old)
    make_locks(env, 1900, 7)
    make_locks(env, None, 20, system=False, entity_type="customers")
    make_locks(env, 424242, 2, prefix="ghost")  # a billing_id with no run behind it
    return env


@pytest.fixture
def procedure_without_delete(unprotected_env: Environment) -> Iterator[Environment]:
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute(PROCEDURE_WITHOUT_DELETE)
    yield unprotected_env
    contract_schema_apply(unprotected_env)  # CREATE OR REPLACE puts the contract's body back


# --- JSON: every figure equals the seed query and plain counts ---------------------------------


def test_the_json_report_equals_the_seed_query_and_plain_counts(shaped: Environment) -> None:
    envs = all_environments()
    report = json_report(envs)
    assert [env["key"] for env in report["environments"]] == [env.key for env in envs]
    for env in envs:
        entry = by_key(report)[env.key]
        assert entry["reachable"] is True and entry["error"] is None
        assert (entry["label"], entry["host"]) == (env.label, env.host)
        assert {key: entry[key] for key in ENVIRONMENT_KEYS[5:10]} == plain_counts(env)
        assert entry["completed_with_locks"] == len(seed_query(env)) == len(entry["stuck_runs"])
        assert entry["stuck_runs"] == expected_runs(env)
    shaped_entry = by_key(report)[shaped.key]
    assert [run["billing_run_id"] for run in shaped_entry["stuck_runs"]] == [1700, 1620]
    assert shaped_entry["stuck_runs"][1]["lock_count"] == 3250
    assert shaped_entry["total_locks"] == 3250 + 3 + 5 + 7 + 20 + 2
    assert shaped_entry["locks_without_billing"] == 20


def test_an_empty_environment_reports_zeros_and_no_runs(shaped: Environment, empty_env: Environment) -> None:
    entry = by_key(json_report([empty_env]))[empty_env.key]
    assert entry["reachable"] is True
    assert [entry[key] for key in ENVIRONMENT_KEYS[5:10]] == [0, 0, 0, 0, 0]
    assert entry["stuck_runs"] == []


def test_the_json_has_exactly_the_stable_keys_in_order(shaped: Environment, extra_environment) -> None:
    down = down_environment(extra_environment)
    report = json_report([shaped, down])
    assert list(report) == ["environments"]
    for entry in report["environments"]:
        assert list(entry) == ENVIRONMENT_KEYS
        for run in entry["stuck_runs"]:
            assert list(run) == RUN_KEYS
    assert by_key(report)[shaped.key]["stuck_runs"], "the shape of a run was not checked"


def test_dates_carry_their_offset_and_counts_are_integers(shaped: Environment) -> None:
    entry = by_key(json_report([shaped]))[shaped.key]
    for key in ENVIRONMENT_KEYS[5:10]:
        assert type(entry[key]) is int, key
    run = entry["stuck_runs"][1]
    assert type(run["billing_run_id"]) is int and type(run["lock_count"]) is int
    assert run["create_date"] == "2025-12-22T11:02:08+00:00"
    assert run["modify_date"] == "2025-12-22T11:02:28+00:00"
    assert datetime.fromisoformat(run["create_date"]).utcoffset() == timedelta(0)
    assert run["locked_entity_types"] == ["currencies", "customers", "points-of-delivery", "vat-rates"]


def test_unknown_status_labels_and_extra_columns_change_nothing(
    unprotected_env: Environment, clean_environments: None
) -> None:
    env = unprotected_env
    with connections[env.alias].cursor() as cursor:
        # ADD VALUE commits at once in a transactional test; an enum label cannot be dropped.
        cursor.execute("ALTER TYPE billing.billing_status ADD VALUE IF NOT EXISTS 'HELD_FOR_AUDIT'")
        cursor.execute("ALTER TABLE billing.billings ADD COLUMN tenant text DEFAULT 'acme'")
        cursor.execute("ALTER TABLE lock.locks ADD COLUMN reason text DEFAULT 'billing'")
    try:
        make_run(env, 10, status="HELD_FOR_AUDIT")
        make_locks(env, 10, 4)
        make_run(env, 11, stage="DRAFT")
        make_locks(env, 11, 6)
        entry = by_key(json_report([env]))[env.key]
        assert {key: entry[key] for key in ENVIRONMENT_KEYS[5:10]} == plain_counts(env)
        assert entry["stuck_runs"] == expected_runs(env)
        assert [run["billing_run_id"] for run in entry["stuck_runs"]] == [11]
        assert entry["total_runs"] == 2 and entry["total_locks"] == 10
    finally:
        with connections[env.alias].cursor() as cursor:
            cursor.execute("ALTER TABLE billing.billings DROP COLUMN IF EXISTS tenant")
            cursor.execute("ALTER TABLE lock.locks DROP COLUMN IF EXISTS reason")


# --- Environments that cannot be read ----------------------------------------------------------


def test_an_unreachable_environment_is_reported_and_the_others_are_intact(
    shaped: Environment, extra_environment
) -> None:
    down = down_environment(extra_environment)
    report = json_report([down, shaped])
    entry = by_key(report)["down"]
    assert entry["reachable"] is False
    assert "Connection refused" in entry["error"] or "connect" in entry["error"].lower()
    assert [entry[key] for key in ENVIRONMENT_KEYS[5:10]] == [None] * 5
    assert entry["stuck_runs"] == []
    assert entry["host"] == down.host
    intact = by_key(report)[shaped.key]
    assert intact["reachable"] is True and intact["stuck_runs"] == expected_runs(shaped)
    assert "secret-pw" not in render_json(lock_report([down]))


def test_a_failing_run_query_makes_only_that_environment_unreachable(
    shaped: Environment, empty_env: Environment, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = reports.stuck_runs

    def failing_for_shaped(env: Environment, filters=None):
        if env.key == shaped.key:
            raise TimeoutError("canceling statement due to statement timeout\nCONTEXT: noise")
        return real(env, filters)

    monkeypatch.setattr(reports, "stuck_runs", failing_for_shaped)
    report = json_report([shaped, empty_env])
    failed = by_key(report)[shaped.key]
    assert failed["reachable"] is False
    assert failed["error"] == "TimeoutError: canceling statement due to statement timeout"
    assert failed["total_runs"] is None and failed["stuck_runs"] == []
    assert by_key(report)[empty_env.key]["reachable"] is True


# --- CSV ---------------------------------------------------------------------------------------


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def test_the_csv_has_a_row_per_stuck_run_and_one_per_environment_without(
    shaped: Environment, empty_env: Environment, extra_environment
) -> None:
    down = down_environment(extra_environment)
    text = render_csv(lock_report([shaped, empty_env, down]))
    assert text.splitlines()[0] == (
        "environment,label,host,billing_run_id,billing_number,status,process_stage,"
        "create_date,modify_date,lock_count,locked_entity_types,error"
    )
    rows = csv_rows(text)
    runs = [row for row in rows if row["billing_run_id"]]
    assert [(row["environment"], row["billing_run_id"], row["lock_count"]) for row in runs] == [
        (shaped.key, "1700", "3"),
        (shaped.key, "1620", "3250"),
    ]
    assert runs[1]["locked_entity_types"] == "currencies, customers, points-of-delivery, vat-rates"
    assert runs[1]["create_date"] == "2025-12-22T11:02:08+00:00" and runs[1]["error"] == ""
    clean, unreachable = (row for row in rows if not row["billing_run_id"])
    assert clean["environment"] == empty_env.key and clean["error"] == "" and clean["lock_count"] == ""
    assert unreachable["environment"] == "down" and unreachable["error"]


def test_the_csv_escapes_cells_a_spreadsheet_would_run_as_formulas(
    unprotected_env: Environment, clean_environments: None
) -> None:
    env = unprotected_env
    numbers = {
        1: '=HYPERLINK("http://evil.example","x")',
        2: "+1+1",
        3: "-2+3",
        4: "@SUM(A1)",
        5: "\tTAB",
        6: "\rCR",
        7: "BILLING202512220055",
    }
    for run_id, number in numbers.items():
        make_run(env, run_id, number=number)
        make_locks(env, run_id, 1, entity_type="=cmd|' /C calc'!A0" if run_id == 1 else "customers")
    rows = {row["billing_run_id"]: row for row in csv_rows(render_csv(lock_report([env])))}
    for run_id, number in numbers.items():
        expected = number if run_id == 7 else "'" + number
        assert rows[str(run_id)]["billing_number"] == expected
    assert rows["1"]["locked_entity_types"] == "'=cmd|' /C calc'!A0"
    assert rows["7"]["lock_count"] == "1"  # numbers stay numbers


# --- Markdown ----------------------------------------------------------------------------------


def test_the_markdown_has_the_seed_reports_sections_and_query(
    shaped: Environment, empty_env: Environment
) -> None:
    make_locks(empty_env, None, 20, system=False, entity_type="customers")
    text = render_markdown(lock_report([shaped, empty_env]), generated_at=GENERATED_AT)
    for heading in (
        "# Billing Run Lock Analysis - All Environments",
        "**Date:** 2026-01-24 09:30 UTC",
        "## Executive Summary",
        "## Database Analysis Results",
        "### Environment Summary",
        "| Environment | Host | Total Billing Runs | COMPLETED Billing Runs | COMPLETED with Locks "
        "| Total Locks |",
        "### Detailed Findings",
        f"#### {shaped.label} Environment ({shaped.host})",
        "## Query Used",
        "## Observations",
        "## Recommendations",
        "## Conclusion",
    ):
        assert heading in text, heading
    assert f"```sql\n{STUCK_RUNS_SQL.strip()}\n```" in text
    assert "⚠️ **RESULT:** 2 billing runs with status COMPLETED still hold 3,253 locks" in text
    assert f"| **{shaped.label}** | {shaped.host} | 5 | 3 | 2 | 3,287 |" in text
    assert f"| **{empty_env.label}** | {empty_env.host} | 0 | 0 | 0 | 20 |" in text
    assert "| 1620 | BILLING202512220055 | COMPLETED | DRAFT | 2025-12-22 11:02:08+00:00 |" in text
    assert "| 3,250 | currencies, customers, points-of-delivery, vat-rates |" in text
    assert f"{empty_env.label}: 20 locks, all with NULL billing_id" in text
    assert "All existing locks are not associated with billing runs" in text
    assert f"**Empty Billing Runs Tables:** {empty_env.label} shows 0 billing runs" in text
    assert "the most: BILLING202512220055 (run 1620) with 3,250 locks" in text
    assert "1 run still in process stage DRAFT" in text
    assert f"{shaped.label}: exists and deletes the run's locks" in text
    assert f"{shaped.label}: missing: each stuck-lock query reads all 3,287 locks" in text
    assert "1 IN_PROGRESS_ACCOUNTING run unchanged for over" in text
    assert "1 run on the error path (GENERATED or failed) still holding locks" in text
    assert "**Status:** Action needed: 2 COMPLETED billing runs still hold 3,253 locks." in text


def test_a_clean_report_says_none_found(unprotected_env: Environment, clean_environments: None) -> None:
    text = render_markdown(lock_report(all_environments()), generated_at=GENERATED_AT)
    assert (
        "✅ **RESULT:** No billing runs with status COMPLETED that have locked objects were found "
        "in any environment." in text
    )
    assert text.count("No COMPLETED billing run holds locks.") == len(all_environments())


def test_the_markdown_reports_a_procedure_that_keeps_locks_and_an_index(
    shaped: Environment, procedure_without_delete: Environment
) -> None:
    with connections[shaped.alias].cursor() as cursor:
        cursor.execute("CREATE INDEX locks_billing_id_for_test ON lock.locks (billing_id)")
    try:
        text = render_markdown(lock_report([shaped]), generated_at=GENERATED_AT)
    finally:
        with connections[shaped.alias].cursor() as cursor:
            cursor.execute("DROP INDEX lock.locks_billing_id_for_test")
    assert f"{shaped.label}: exists, but its body has no DELETE FROM lock.locks" in text
    assert f"{shaped.label}: present" in text
    assert "### 2. Fix the Lock Release" in text


def test_the_markdown_names_an_unreachable_environment(shaped: Environment, extra_environment) -> None:
    down = down_environment(extra_environment)
    text = render_markdown(lock_report([down]), generated_at=GENERATED_AT)
    assert "**Environments Unreachable:** Down" in text
    assert "⚠️ **NOT ANALYZED:** Down could not be queried" in text
    assert f"| **Down** (unreachable) | {down.host} | - | - | - | - |" in text
    assert "**Unreachable Environments:**" in text and "Restore Access" in text
    assert "secret-pw" not in text


def test_the_markdown_caps_the_runs_table_and_says_how_many_were_left_out(
    unprotected_env: Environment, clean_environments: None
) -> None:
    env = unprotected_env
    total = reports.MARKDOWN_RUNS_PER_ENVIRONMENT + 7
    for run_id in range(1, total + 1):
        make_run(env, run_id)
        make_locks(env, run_id, 2, entity_type="customers")
    text = render_markdown(lock_report([env]), generated_at=GENERATED_AT)
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and "BILLING" in line]
    assert len(table_rows) == reports.MARKDOWN_RUNS_PER_ENVIRONMENT
    assert "… and 7 more runs holding 14 locks, not shown here" in text
    # the exports keep every run
    assert len(json.loads(render_json(lock_report([env])))["environments"][0]["stuck_runs"]) == total


def test_the_markdown_escapes_table_cells(unprotected_env: Environment, clean_environments: None) -> None:
    env = unprotected_env
    make_run(env, 1, number="BILL|ING\nNEXT <b>")
    make_locks(env, 1, 1, entity_type="a|b")
    text = render_markdown(lock_report([env]), generated_at=GENERATED_AT)
    row = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert "BILL\\|ING NEXT \\<b\\>" in row and "a\\|b" in row
    assert row.count(" | ") == 7  # eight cells, none split


def test_a_report_loaded_back_from_json_renders_without_the_procedure_figures(shaped: Environment) -> None:
    loaded = json.loads(render_json(lock_report([shaped])))
    text = render_markdown(loaded, generated_at=GENERATED_AT)
    assert "| 1620 | BILLING202512220055 |" in text
    assert "make_billing_run_real`):**" not in text


def test_the_markdown_refuses_a_naive_date() -> None:
    with pytest.raises(ValueError, match="aware"):
        render_markdown({"environments": []}, generated_at=datetime(2026, 1, 1))


# --- The command -------------------------------------------------------------------------------


def run_command(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("lock_report", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_the_command_prints_the_json_report(shaped: Environment, empty_env: Environment) -> None:
    out, err = run_command("--format", "json", "--env", shaped.key, "--env", empty_env.key)
    report = json.loads(out)
    assert [env["key"] for env in report["environments"]] == [shaped.key, empty_env.key]
    assert by_key(report)[shaped.key]["stuck_runs"] == expected_runs(shaped)
    assert err == ""


def test_the_command_reports_every_environment_by_default(shaped: Environment) -> None:
    out, _ = run_command("--format", "json")
    assert [env["key"] for env in json.loads(out)["environments"]] == [e.key for e in all_environments()]


def test_the_command_writes_markdown_and_csv_to_a_file(shaped: Environment, tmp_path) -> None:
    markdown = tmp_path / "report.md"
    out, _ = run_command("--env", shaped.key, "--output", str(markdown))  # markdown is the default
    assert "wrote the markdown report on 1 environment(s)" in out
    assert markdown.read_text().startswith("# Billing Run Lock Analysis - All Environments\n")
    assert STUCK_RUNS_SQL.strip() in markdown.read_text()

    table = tmp_path / "report.csv"
    run_command("--env", shaped.key, "--format", "csv", "--output", str(table))
    with open(table, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [row["billing_run_id"] for row in rows] == ["1700", "1620"]
    assert sorted(tmp_path.iterdir()) == sorted([markdown, table])  # no temporary file left behind


def test_the_command_refuses_an_unknown_environment_and_names_it(clean_environments: None) -> None:
    with pytest.raises(CommandError, match="'nowhere'"):
        run_command("--env", "nowhere", "--format", "json")


def test_the_command_warns_about_an_unreachable_environment_and_still_reports(
    shaped: Environment, extra_environment
) -> None:
    down_environment(extra_environment)
    out, err = run_command("--env", "down", "--env", shaped.key, "--format", "json")
    report = by_key(json.loads(out))
    assert report["down"]["reachable"] is False and report[shaped.key]["reachable"] is True
    assert "down (Down) was unreachable" in err
    assert "secret-pw" not in out + err
