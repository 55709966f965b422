"""The batch upsert of missing invoice lines (runbook §3) against a real environment database.

The runbook's own queries (§4.1, §4.2, §5.4) are run verbatim on what it wrote.
"""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import connections

from audit.chain import entry_hash
from audit.selectors import environment_chain_verify
from billing_ops.environments import Environment, environment_connect
from billing_ops.models import Job, JobLogLine, JobStatus
from billing_ops.services import job_execute
from reconciliation.csvfile import CsvError, read_header
from reconciliation.models import UpsertRun, UpsertRunStatus
from reconciliation.services import file_chunks, upsert_request
from reconciliation.upsert import UpsertFailed, UpsertRefused, batch_upsert
from tests.conftest import _test_url, make_user

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

HEADER = "invoice_id,unit_id,line_type,description,quantity,amount\n"

# Runbook §4.1 and §4.2, verbatim but for the run id.
RUNBOOK_4_1_TOTAL = "SELECT COUNT(*) AS total_lines FROM invoice_lines;"
RUNBOOK_4_1_DUPLICATES = """
SELECT COUNT(*) FROM (
  SELECT invoice_id, unit_id, line_type,
         normalized_description
  FROM invoice_lines
  GROUP BY 1, 2, 3, 4
  HAVING COUNT(*) > 1
) sub;
"""
RUNBOOK_4_2 = """
SELECT action,
       (new_data->>'operation') AS op,
       (new_data->>'run_id') AS run_id,
       COUNT(*) AS cnt
FROM audit_logs
WHERE action = 'upsert_missing_lines'
  AND new_data->>'run_id' = '{run_id}'
GROUP BY 1, 2, 3;
"""
# Runbook §5.4 over the whole table (its LIMIT 100 dropped).
RUNBOOK_5_4 = """
SELECT id, hash, previous_hash,
       LAG(hash) OVER (ORDER BY created_at) AS expected_previous
FROM audit_logs
ORDER BY created_at DESC
"""


class Recorder:
    def __init__(self, cancel_after_batch: int | None = None) -> None:
        self.lines: list[str] = []
        self.cancel_after_batch = cancel_after_batch
        self.batches = 0

    def log(self, message: str) -> None:
        self.lines.append(message)

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        if message.startswith("Batch"):
            self.batches += 1

    def check_cancel(self) -> None:
        pass


def write_csv(tmp_path: Path, body: str, *, name: str = "missing_lines.csv", header: str = HEADER) -> Path:
    path = tmp_path / name
    path.write_bytes((header + body).encode("utf-8"))
    return path


def run(
    env: Environment,
    path: Path,
    *,
    run_id: str = "run-1",
    batch_size: int = 50_000,
    dry_run: bool = False,
    report: Recorder | None = None,
) -> Any:
    report = report or Recorder()
    with environment_connect(env) as conn:
        return batch_upsert(
            conn,
            csv_path=path,
            csv_name=path.name,
            header=read_header(path),
            run_id=run_id,
            batch_size=batch_size,
            dry_run=dry_run,
            report=report,
        )


def request_upsert(
    actor: Any,
    env: Environment,
    path: Path,
    run_id: str,
    *,
    csv_name: str | None = None,
    dry_run: bool = False,
) -> Job:
    """The form's request, as the web view and the command make it."""
    return upsert_request(
        actor=actor,
        environment=env.key,
        chunks=file_chunks(path),
        csv_name=csv_name or path.name,
        run_id=run_id,
        batch_size=10,
        dry_run=dry_run,
    )


def query(env: Environment, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with environment_connect(env) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


def existing_line(
    env: Environment, invoice: str, unit: str, line_type: str, description: str, q: str, a: str
) -> str:
    rows = query(
        env,
        r"""
        INSERT INTO invoice_lines
               (invoice_id, unit_id, line_type, description, normalized_description, quantity, amount)
        VALUES (%s, %s, %s, %s, regexp_replace(lower(trim(%s)), '\s+', ' ', 'g'), %s, %s) RETURNING id::text
        """,
        [invoice, unit, line_type, description, description, q, a],
    )
    return rows[0][0]


def snapshot(env: Environment) -> tuple[Any, ...]:
    lines = query(env, "SELECT id, description, quantity, amount FROM invoice_lines ORDER BY id")
    audit = query(env, "SELECT id, hash FROM audit_logs ORDER BY id")
    return (lines, audit)


def assert_chain_intact(env: Environment) -> None:
    broken = [row for row in query(env, RUNBOOK_5_4)[:-1] if row[2] != row[3]]
    assert broken == []
    report = environment_chain_verify(env=env)
    assert report.intact, report.damages


@pytest.fixture
def env(unprotected_env: Environment, clean_environments: None) -> Environment:
    return unprotected_env


def test_inserts_updates_and_leaves_identical_lines_alone(env, tmp_path) -> None:
    updated_id = existing_line(env, "INV-1", "U-1", "ENERGY", "Active energy  Jan", "10.5", "5.00")
    same_id = existing_line(env, "INV-1", "U-1", "TAX", "Excise tax", "1", "2.10")
    path = write_csv(
        tmp_path,
        # messy case and whitespace: the same key as the existing ENERGY line, new values
        '"INV-1",U-1,ENERGY,"  ACTIVE energy\tJAN ",11.25,6.50\r\n'
        "INV-1,U-1,TAX,Excise tax,1.000,2.1\r\n"  # identical after numeric equality: unchanged
        'INV-2,U-9,FEE,"Meter fee, with comma",2,3.00\r\n'
        'INV-3,U-9,FEE,"two\nlines",1,1\r\n',
    )
    report = Recorder()
    outcome = run(env, path, run_id="manual-20260208-fix42", report=report)

    assert (outcome.rows_streamed, outcome.inserted, outcome.updated, outcome.unchanged) == (4, 2, 1, 1)
    assert report.lines[0] == "[batch_upsert] Loading CSV: missing_lines.csv"
    assert report.lines[1] == "[batch_upsert] COPY streamed 4 rows into tmp_invoice_lines"
    assert report.lines[2].startswith("[batch_upsert] Upsert complete: 2 inserted, 1 updated (")
    assert "[batch_upsert] Audit logs written for run_id=manual-20260208-fix42" in report.lines
    assert report.lines[-1] == "[batch_upsert] Done."

    assert query(env, RUNBOOK_4_1_TOTAL) == [(4,)]
    assert query(env, RUNBOOK_4_1_DUPLICATES) == [(0,)]
    assert sorted(query(env, RUNBOOK_4_2.format(run_id="manual-20260208-fix42"))) == [
        ("upsert_missing_lines", "insert", "manual-20260208-fix42", 2),
        ("upsert_missing_lines", "update", "manual-20260208-fix42", 1),
    ]
    (line,) = query(
        env,
        "SELECT description, normalized_description, quantity, amount FROM invoice_lines WHERE id = %s",
        [updated_id],
    )
    assert line == ("  ACTIVE energy\tJAN ", "active energy jan", Decimal("11.250000"), Decimal("6.50"))
    ((old, new),) = query(env, "SELECT old_data, new_data FROM audit_logs WHERE record_id = %s", [updated_id])
    assert old == {
        "invoice_id": "INV-1",
        "unit_id": "U-1",
        "line_type": "ENERGY",
        "description": "Active energy  Jan",
        "quantity": "10.500000",
        "amount": "5.00",
    }
    assert (
        new["operation"] == "update"
        and new["quantity"] == "11.250000"
        and new["run_id"] == "manual-20260208-fix42"
    )
    # Every row of the run is one the chain verification recomputes, not only links.
    assert query(
        env, "SELECT count(*) FROM audit_logs WHERE new_data ->> 'hash_scheme' = 'billing-ops/2'"
    ) == [(3,)]
    assert query(env, "SELECT count(*) FROM audit_logs WHERE record_id = %s", [same_id]) == [(0,)]
    (quoted,) = query(env, "SELECT description FROM invoice_lines WHERE invoice_id = 'INV-3'")
    assert quoted == ("two\nlines",)
    assert_chain_intact(env)


def test_keys_that_collide_after_normalization_keep_the_last_row_in_one_batch_and_across_batches(
    env, tmp_path
) -> None:
    body = (
        "INV-1,U-1,ENERGY,Active energy,1,1\n"
        "INV-1,U-1,NETWORK,Network,1,1\n"
        "INV-1,U-1,ENERGY,  active   ENERGY ,2,2\n"  # same key as row 1
        "INV-2,U-1,ENERGY,x,1,1\n"
        "INV-2,U-1,ENERGY,X,3,3\n"  # same key as row 4
        "INV-1,U-1,ENERGY,ACTIVE ENERGY,4,4\n"  # same key as rows 1 and 3: this one wins
    )
    for batch_size, run_id in ((50_000, "one-batch"), (1, "many-batches")):
        query(env, "TRUNCATE invoice_lines, audit_logs")
        outcome = run(env, write_csv(tmp_path, body), run_id=run_id, batch_size=batch_size)
        assert (outcome.inserted, outcome.updated, outcome.duplicates) == (3, 0, 3)
        assert {tuple(d["rows"]) for d in outcome.duplicate_examples} == {(1, 3, 6), (4, 5)}
        assert query(
            env,
            "SELECT description, quantity FROM invoice_lines"
            " WHERE invoice_id = 'INV-1' AND line_type = 'ENERGY'",
        ) == [("ACTIVE ENERGY", Decimal("4.000000"))]
        assert query(env, "SELECT description FROM invoice_lines WHERE invoice_id = 'INV-2'") == [("X",)]
    assert outcome.batches == 3


@pytest.mark.parametrize(
    ("row", "line", "column", "problem"),
    [
        ("INV-9,U-1,FEE,fee,abc,1", 4, "quantity", "not a plain decimal number"),
        ('INV-9,U-1,FEE,fee,1,"1,5"', 4, "amount", "not a plain decimal number"),
        ("INV-9,U-1,FEE,fee,1,-2", 4, "amount", "negative"),
        ("INV-9,U-1,FEE,fee,1,NaN", 4, "amount", "not a number"),
        ("INV-9,U-1,FEE,fee,1,99999999999999999999", 4, "amount", "too large"),
        ("INV-9,,FEE,fee,1,1", 4, "unit_id", "missing"),
        ('INV-9,"",FEE,fee,1,1', 4, "unit_id", "empty"),
        ("INV-9,U-1,FEE,fee,1", 4, None, "missing data for column"),
        ("INV-9,U-1,FEE,fee,1,1,1", 4, None, "extra data"),
        ("INV-9,U-1,FEE," + "d" * 2001 + ",1,1", 4, "description", "longer than 2,000"),
    ],
)
def test_a_bad_value_names_its_line_and_column_and_nothing_is_written(
    env, tmp_path, row, line, column, problem
) -> None:
    existing_line(env, "INV-1", "U-1", "ENERGY", "a", "1", "1")
    before = snapshot(env)
    # Row 2 spans two lines: the bad row is on line 4 of the file.
    path = write_csv(tmp_path, 'INV-1,U-1,ENERGY,"a\nb",2,2\n' + row + "\n")
    with pytest.raises(CsvError) as caught:
        run(env, path)
    assert (caught.value.line, caught.value.column) == (line, column)
    assert problem in str(caught.value) and "missing_lines.csv, line 4" in str(caught.value)
    assert snapshot(env) == before


def test_not_utf8_is_refused_with_its_line(env, tmp_path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(HEADER.encode() + "INV-1,U-1,FEE,Gebühr,1,1\n".encode("latin-1"))
    with pytest.raises(
        CsvError, match=r"latin1.csv, line 2, column description: is not valid UTF-8 \(byte 0xfc"
    ):
        run(env, path)
    assert snapshot(env) == ([], [])


def test_a_failure_in_a_later_batch_rolls_back_the_earlier_ones_and_writes_no_audit(env, tmp_path) -> None:
    existing_line(env, "INV-0", "U-1", "FEE", "fee", "1", "1")
    query(
        env,
        """
        CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.invoice_id = 'INV-BOOM' THEN RAISE EXCEPTION 'injected failure'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER boom BEFORE INSERT ON invoice_lines FOR EACH ROW EXECUTE FUNCTION boom();
        """,
    )
    try:
        before = snapshot(env)
        body = "".join(f"INV-{n},U-1,FEE,fee,1,1\n" for n in range(1, 9)) + "INV-BOOM,U-1,FEE,fee,1,1\n"
        report = Recorder()
        with pytest.raises(psycopg.errors.RaiseException, match="injected failure"):
            run(env, write_csv(tmp_path, body), batch_size=2, report=report)
        assert report.batches >= 4  # batches before the failing one ran, and were rolled back
        assert snapshot(env) == before
    finally:
        query(env, "DROP TRIGGER boom ON invoice_lines; DROP FUNCTION boom()")


@pytest.mark.parametrize("statement", ["INSERT", "UPDATE"])
def test_a_line_the_database_silently_skips_stops_the_run_and_nothing_is_written(
    env, tmp_path, statement
) -> None:
    """A trigger of the platform's that drops a row without an error (BEFORE INSERT also
    sees the rows ON CONFLICT proposes): the lines written no longer match what the lock
    predicted, so the audit would not match the table either."""
    existing_line(env, "INV-0", "U-1", "FEE", "fee", "1", "1")
    query(
        env,
        f"""
        CREATE FUNCTION skip_it() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.invoice_id IN ('INV-SKIP', 'INV-0') THEN RETURN NULL; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER skip_it BEFORE {statement} ON invoice_lines FOR EACH ROW EXECUTE FUNCTION skip_it();
        """,
    )
    try:
        before = snapshot(env)
        body = "INV-0,U-1,FEE,fee,2,2\nINV-1,U-1,FEE,fee,1,1\nINV-SKIP,U-1,FEE,fee,1,1\n"
        expected = "wrote 1 new and 0 changed" if statement == "INSERT" else "wrote 2 new and 0 changed"
        with pytest.raises(
            UpsertFailed, match=f"{expected} lines where 2 and 1 were expected; nothing was committed"
        ):
            run(env, write_csv(tmp_path, body))
        assert snapshot(env) == before
    finally:
        query(env, "DROP TRIGGER skip_it ON invoice_lines; DROP FUNCTION skip_it()")


class InsertsMeanwhile(Recorder):
    """Another session inserts a line of the file once the existing lines are locked."""

    def __init__(self, env: Environment, description: str) -> None:
        super().__init__()
        self.env, self.description = env, description

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        if message.startswith("Normalized"):
            existing_line(self.env, "INV-2", "U-1", "FEE", self.description, "1", "1")
        super().progress(done, total, message)


@pytest.mark.parametrize("description", ["fee", " FEE"], ids=["identical", "same-key-other-spelling"])
def test_a_line_another_session_inserts_meanwhile_stops_the_run_and_nothing_is_written(
    env, tmp_path, description
) -> None:
    existing_line(env, "INV-1", "U-1", "FEE", "fee", "1", "1")
    path = write_csv(tmp_path, "INV-1,U-1,FEE,fee,2,2\nINV-2,U-1,FEE,fee,1,1\nINV-3,U-1,FEE,fee,1,1\n")
    before = query(env, "SELECT id, amount FROM invoice_lines WHERE invoice_id = 'INV-1'")
    with pytest.raises(
        UpsertFailed, match=r"another session inserted a line with the key \(INV-2, U-1, FEE, fee\)"
    ):
        run(env, path, report=InsertsMeanwhile(env, description))
    assert query(env, "SELECT id, amount FROM invoice_lines WHERE invoice_id = 'INV-1'") == before
    assert query(env, "SELECT count(*) FROM invoice_lines WHERE invoice_id = 'INV-3'") == [(0,)]
    assert query(env, "SELECT count(*) FROM audit_logs") == [(0,)]


def test_new_lines_get_time_ordered_ids_adjacent_within_a_run(env, tmp_path) -> None:
    body = "".join(f"INV-{n},U-1,FEE,fee,1,1\n" for n in range(1, 6))
    run(env, write_csv(tmp_path, body), run_id="first")
    run(env, write_csv(tmp_path, body.replace("INV-", "INV-B")), run_id="second")
    rows = query(env, "SELECT id::text, invoice_id FROM invoice_lines ORDER BY id")
    assert {row[0][14] for row in rows} == {"7"}  # the UUID version
    assert {row[0][19] for row in rows} <= set("89ab")  # the RFC 9562 variant
    expected = [f"INV-{n}" for n in range(1, 6)] + [f"INV-B{n}" for n in range(1, 6)]
    assert [inv for _id, inv in rows] == expected
    assert_chain_intact(env)


def test_a_dry_run_reports_the_real_counts_and_changes_nothing(env, tmp_path) -> None:
    existing_line(env, "INV-1", "U-1", "ENERGY", "old", "1", "1")
    path = write_csv(tmp_path, "INV-1,U-1,ENERGY,OLD,2,2\nINV-2,U-1,FEE,fee,1,1\nINV-3,U-1,FEE,fee,1,1\n")
    before = snapshot(env)
    report = Recorder()
    dry = run(env, path, run_id="try", dry_run=True, report=report)
    assert snapshot(env) == before
    assert any("Dry run: rolled back" in line for line in report.lines)
    real = run(env, path, run_id="real")
    assert (
        (dry.inserted, dry.updated, dry.unchanged)
        == (real.inserted, real.updated, real.unchanged)
        == (2, 1, 0)
    )


def test_the_upsert_refuses_to_start_without_a_valid_dedup_index(env, tmp_path) -> None:
    path = write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,1\n")
    query(env, "DROP INDEX idx_invoice_lines_dedup")
    try:
        with pytest.raises(UpsertRefused, match="idx_invoice_lines_dedup"):
            run(env, path)
        # A failed CONCURRENTLY build leaves an invalid index behind.
        query(
            env,
            "INSERT INTO invoice_lines (invoice_id, unit_id, line_type, description, normalized_description) "
            "VALUES ('I', 'U', 'T', 'd', 'd'), ('I', 'U', 'T', 'd', 'd')",
        )
        with environment_connect(env, autocommit=True) as conn, pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY idx_invoice_lines_dedup "
                "ON invoice_lines (invoice_id, unit_id, line_type, normalized_description)"
            )
        assert query(
            env, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx_invoice_lines_dedup'::regclass"
        ) == [(False,)]
        with pytest.raises(UpsertRefused, match="idx_invoice_lines_dedup"):
            run(env, path)
        assert query(env, "SELECT count(*) FROM invoice_lines") == [(2,)]
    finally:
        query(
            env,
            "DROP INDEX IF EXISTS idx_invoice_lines_dedup; TRUNCATE invoice_lines; "
            "CREATE UNIQUE INDEX idx_invoice_lines_dedup "
            "ON invoice_lines (invoice_id, unit_id, line_type, normalized_description)",
        )


def test_two_runs_appending_at_once_keep_one_chain(env, tmp_path) -> None:
    for n in range(3):  # another writer's rows before
        query(
            env,
            "INSERT INTO audit_logs (action, record_id, hash, previous_hash) "
            "SELECT 'other', %s, md5(%s), (SELECT hash FROM audit_logs ORDER BY created_at DESC LIMIT 1)",
            [str(n), str(n)],
        )
    paths = [
        write_csv(tmp_path, "".join(f"INV-{k}-{n},U-1,FEE,fee,1,1\n" for n in range(3000)), name=f"f{k}.csv")
        for k in range(2)
    ]
    errors: list[BaseException] = []

    def one(k: int) -> None:
        try:
            run(env, paths[k], run_id=f"concurrent-{k}", batch_size=500)
        except BaseException as exc:
            errors.append(exc)

    stop = threading.Event()
    others: list[int] = []

    def other_writer() -> None:
        # Another writer that links each row to the head in one statement (created_at
        # defaults to clock_timestamp()), all the while the upserts run.
        with environment_connect(env, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "INSERT INTO audit_logs (action, record_id, hash, previous_hash) SELECT 'other', 'x',"
                    " md5(random()::text), (SELECT hash FROM audit_logs ORDER BY created_at DESC LIMIT 1)"
                )
                others.append(1)

    writer = threading.Thread(target=other_writer)
    writer.start()
    threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    writer.join()
    assert errors == []
    assert others, "the other writer never wrote"
    total = 6003 + len(others)
    assert query(env, "SELECT count(*) FROM audit_logs") == [(total,)]
    assert query(env, "SELECT count(DISTINCT created_at) FROM audit_logs") == [(total,)]
    assert_chain_intact(env)


def test_the_hash_ignores_the_session_time_zone_and_date_style_and_trailing_zeros(env, tmp_path) -> None:
    run(env, write_csv(tmp_path, 'INV-1,U-1,FEE,"Fee ""quoted"" é\\",10.50,1.5\n'), run_id="first")
    # Recomputed in Python from rows read by a session set up as unlike UTC/ISO as possible.
    with environment_connect(env) as conn, conn.cursor(binary=True) as cur:
        cur.execute("SET TimeZone = 'Pacific/Chatham'")
        cur.execute("SET DateStyle = 'SQL, DMY'")
        cur.execute(
            "SELECT action, record_id, old_data, new_data, created_at, previous_hash, hash FROM audit_logs"
        )
        ((action, record_id, old, new, created_at, previous, digest),) = cur.fetchall()
    assert digest == entry_hash(
        action=action,
        record_id=record_id,
        old_data=old,
        new_data=new,
        created_at=created_at,
        previous_hash=previous,
    )
    assert new["description"] == 'Fee "quoted" é\\' and new["quantity"] == "10.500000"
    # 10.5 is the same quantity as 10.50: nothing to rewrite, nothing to audit.
    again = run(env, write_csv(tmp_path, 'INV-1,U-1,FEE,"Fee ""quoted"" é\\",10.5,1.50\n'), run_id="second")
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 1)
    assert_chain_intact(env)


def test_a_run_id_is_used_once_per_environment(env, tmp_path, inline_jobs) -> None:
    operator = make_user("op", "Operator")
    path = write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,1\n")

    def request(run_id: str, dry_run: bool = False) -> Job:
        return request_upsert(operator, env, path, run_id, dry_run=dry_run)

    job = request("fix-1")
    job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error
    run_row = UpsertRun.objects.get(job=job)
    assert (run_row.status, run_row.inserted, run_row.csv_name) == (
        UpsertRunStatus.SUCCEEDED,
        1,
        "missing_lines.csv",
    )
    assert [
        line.message for line in JobLogLine.objects.filter(job=job, message__startswith="[batch_upsert]")
    ][-1] == ("[batch_upsert] Done.")
    with pytest.raises(ValidationError, match="already used"):
        request("fix-1")
    request("fix-1", dry_run=True)  # a dry run reserves nothing and may reuse it
    for bad in ("x'; DROP TABLE invoice_lines; --", "../../etc/passwd", ""):
        with pytest.raises(ValidationError, match="not allowed"):
            request(bad)
    # The node script's runs count too: their audit rows hold the run id.
    with pytest.raises(UpsertRefused, match="already has audit rows"):
        run(env, path, run_id="fix-1")


def test_a_failed_job_says_nothing_was_committed_and_removes_the_upload(env, tmp_path, inline_jobs) -> None:
    operator = make_user("op", "Operator")
    path = write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,1\nINV-2,U-1,FEE,fee,x,1\n")
    job = request_upsert(operator, env, path, "bad-1", csv_name="bad.csv")
    from reconciliation.services import upload_path

    stored = upload_path(job.params["upload"])
    assert stored.exists()
    job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("bad.csv, line 3, column quantity: is not a plain decimal number")
    assert job.error.endswith("Nothing was committed.")
    assert UpsertRun.objects.get(job=job).status == UpsertRunStatus.FAILED
    assert not stored.exists()
    assert query(env, "SELECT count(*) FROM invoice_lines") == [(0,)]


def test_the_command_prints_the_runbook_lines(env, tmp_path, inline_jobs, capsys) -> None:
    make_user("operator1", "Operator")
    path = write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,1\n")
    call_command(
        "batch_upsert", "--csv", str(path), "--run-id", "cli-1", "--env", env.key, "--actor", "operator1"
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[batch_upsert] Loading CSV: missing_lines.csv"
    assert out[1] == "[batch_upsert] COPY streamed 1 rows into tmp_invoice_lines"
    assert out[-1] == "[batch_upsert] Done."
    url = _test_url(env.alias)
    call_command(
        "batch_upsert", "--csv", str(path), "--run-id", "cli-2", "--database-url", url, "--actor", "operator1"
    )
    assert (
        capsys.readouterr()
        .out.splitlines()[2]
        .startswith("[batch_upsert] Upsert complete: 0 inserted, 0 updated")
    )
    with pytest.raises(CommandError, match="line 2, column amount"):
        bad = write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,x\n", name="bad.csv")
        call_command(
            "batch_upsert", "--csv", str(bad), "--run-id", "cli-3", "--env", env.key, "--actor", "operator1"
        )


def test_the_form_queues_an_upsert_and_the_pages_show_its_outcome(env, tmp_path, inline_jobs) -> None:
    from django.core.files.uploadedfile import SimpleUploadedFile
    from django.test import Client

    operator, viewer = make_user("op", "Operator"), make_user("viewer", "Viewer")
    client = Client()
    client.force_login(operator)
    url = f"/environments/{env.key}/reconciliation/upsert/"
    body = (HEADER + "INV-1,U-1,FEE,fee,1,1\nINV-1,U-1,FEE,FEE ,2,2\n").encode()

    def post(data: bytes, run_id: str, c: Client = client) -> Any:
        upload = SimpleUploadedFile("lines.csv", data, content_type="text/csv")
        return c.post(url, {"csv": upload, "run_id": run_id, "batch_size": "100"})

    # A bad header is reported on the form, with its line and column; nothing is recorded.
    response = post(b"invoice_id,unit_id,line_type,description,quantity,amount,colour\n", "web-0")
    assert response.status_code == 200
    assert "lines.csv, line 1, column colour: unknown column &#x27;colour&#x27;" in response.content.decode()
    assert not Job.objects.exists() and not UpsertRun.objects.exists()

    response = post(body, "web-1")
    job = Job.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.pk}/"
    assert "Run status" in client.get(f"/jobs/{job.pk}/").content.decode()
    assert "job-details" not in client.get(f"/jobs/{job.pk}/status/").content.decode()  # not yet
    job_execute(job_id=job.pk, worker="test")
    # The poll that sees the job settle also brings the run's section up to date.
    fragment = client.get(f"/jobs/{job.pk}/status/").content.decode()
    details = fragment.split('<div id="job-details" hx-swap-oob="true">')[1]
    assert 'class="status status-succeeded"' in details and "web-1" in details
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "Keys repeated in the file" in page and "[batch_upsert] Done." in page

    viewing = Client()
    viewing.force_login(viewer)
    assert post(body, "web-2", viewing).status_code == 403
    runs = viewing.get(f"/environments/{env.key}/reconciliation/runs/").content.decode()
    assert "web-1" in runs and "web-2" not in runs
    assert f"/environments/{env.key}/reconciliation/?run_id=web-1#verify" in runs
    verify_form = client.get(f"/environments/{env.key}/reconciliation/?run_id=web-1").content.decode()
    assert 'value="web-1"' in verify_form
    run_row = UpsertRun.objects.get(run_id="web-1")
    audit = viewing.get(f"/environments/{env.key}/reconciliation/runs/{run_row.pk}/audit/").content.decode()
    assert "<strong>insert</strong> 1" in audit and "FEE " in audit


def test_the_sample_run_folder_upserts_cleanly(env) -> None:
    sample = (
        Path(__file__).resolve().parent.parent
        / "samples/reconciliations/demo-20261121-fix1/missing_lines.csv"
    )
    outcome = run(env, sample, run_id="sample")
    assert outcome.rows_streamed == 20 and outcome.inserted + outcome.duplicates == 20
    assert query(env, RUNBOOK_4_1_DUPLICATES) == [(0,)]
    assert_chain_intact(env)


def test_in_a_protected_environment_an_approver_sees_the_file_before_approving(
    protected_env, clean_environments, tmp_path, inline_jobs
) -> None:
    from django.test import Client

    operator, approver = make_user("op", "Operator"), make_user("appr", "Approver")
    path = write_csv(tmp_path, 'INV-7,U-1,FEE,"Fee, with comma",1,1\n')
    job = request_upsert(operator, protected_env, path, "prod-fix-1", csv_name="prod-fix.csv")
    assert job.status == JobStatus.AWAITING_APPROVAL
    client = Client()
    client.force_login(approver)
    page = client.get(f"/jobs/{job.pk}/").content.decode()
    assert "prod-fix.csv" in page and "<td>Fee, with comma</td>" in page and "prod-fix-1" in page
    assert query(protected_env, "SELECT count(*) FROM invoice_lines") == [(0,)]


def test_a_cancel_between_batches_rolls_everything_back(env, tmp_path) -> None:
    from billing_ops.services import JobCancelled

    class CancelAfterTwoBatches(Recorder):
        def check_cancel(self) -> None:
            if self.batches >= 2:
                raise JobCancelled()

    existing_line(env, "INV-0", "U-1", "FEE", "fee", "1", "1")
    before = snapshot(env)
    body = "".join(f"INV-{n},U-1,FEE,fee,1,1\n" for n in range(1, 9))
    report = CancelAfterTwoBatches()
    with pytest.raises(JobCancelled):
        run(env, write_csv(tmp_path, body), batch_size=2, report=report)
    assert report.batches == 2
    assert snapshot(env) == before


def test_a_refused_upsert_fails_its_run_and_removes_the_file(
    protected_env, clean_environments, tmp_path, inline_jobs
) -> None:
    from billing_ops.services import job_refuse
    from reconciliation.services import upload_path

    operator, approver = make_user("op", "Operator"), make_user("appr", "Approver")
    job = request_upsert(operator, protected_env, write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,1\n"), "prod-2")
    stored = upload_path(job.params["upload"])
    assert stored.exists()
    job_refuse(actor=approver, job_id=job.pk, comment="not today")
    run_row = UpsertRun.objects.get(job=job)
    assert run_row.status == UpsertRunStatus.FAILED and run_row.error.endswith("Nothing was committed.")
    assert not stored.exists()
    with pytest.raises(ValidationError, match="already used"):  # the run id stays taken
        request_upsert(operator, protected_env, write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,1\n"), "prod-2")


def test_an_upsert_by_database_url_is_in_the_dashboards_audit_trail_without_credentials(
    env, tmp_path
) -> None:
    from audit.models import AuditEntry

    make_user("operator1", "Operator")
    url = _test_url(env.alias)
    call_command(
        "batch_upsert",
        "--csv",
        str(write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,1\n")),
        "--run-id",
        "url-1",
        "--database-url",
        url,
        "--actor",
        "operator1",
    )
    entry = AuditEntry.objects.get(action="upsert.adhoc")
    db = connections[env.alias].settings_dict
    assert entry.environment == f"url:{db['HOST'] or 'localhost'}:{db['PORT'] or 5432}/{db['NAME']}"
    assert entry.actor_name == "operator1" and entry.outcome["status"] == "succeeded"
    assert entry.outcome["inserted"] == "1"
    if db["PASSWORD"]:
        assert db["PASSWORD"] not in f"{entry.environment} {entry.params} {entry.outcome}"
    assert UpsertRun.objects.get(run_id="url-1").environment == entry.environment


def test_an_upsert_cancelled_before_it_ran_fails_its_run_and_removes_the_file(
    env, tmp_path, inline_jobs
) -> None:
    from billing_ops.services import job_cancel
    from reconciliation.services import upload_path

    operator = make_user("op", "Operator")
    job = request_upsert(operator, env, write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,1\n"), "never-ran")
    assert job.status == JobStatus.QUEUED  # the broker is unreachable: no worker took it
    job_cancel(actor=operator, job_id=job.pk)
    assert UpsertRun.objects.get(job=job).status == UpsertRunStatus.FAILED
    assert not upload_path(job.params["upload"]).exists()


def test_the_runs_page_links_audit_rows_only_for_a_run_that_wrote_some(env, tmp_path, client_for) -> None:
    import re

    from django.urls import reverse

    operator = make_user("runs-operator", "Operator")
    path = write_csv(tmp_path, "INV-R,U-1,FEE,fee,1,1\n")
    for run_id in ("wrote-one", "wrote-none"):  # the second finds the line identical
        job = request_upsert(operator, env, path, run_id)
        job_execute(job_id=job.pk, worker="test")
    page = client_for(operator).get(reverse("upsert_runs", args=[env.key])).content.decode()
    cells = {
        run_id: re.sub(r"<[^>]+>|\s+", " ", row.split("</td>")[-3]).split()
        for row in page.split("<tr")
        for run_id in ("wrote-one", "wrote-none")
        if f">{run_id}<" in row
    }
    assert cells == {"wrote-one": ["audit", "rows", "·", "verify", "(§4)"], "wrote-none": ["verify", "(§4)"]}
