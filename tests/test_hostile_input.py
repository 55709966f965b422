"""Bad and hostile input (issue 7): malformed CSV files, and tampered forms and URLs.

The CSV corpus is ``tests/bad_csv/``: every file there is driven through the operator's own
path (``upsert_request``, which the upload form and ``manage.py batch_upsert`` call, then
the job), and must end with an error naming the file, and the line and column where there
is one, with nothing written to the environment. ``ok_*.csv`` files are the contract's
edge cases that must be accepted (a byte-order mark, a quoted newline, the largest values).
The big or hostile files (10 MB in one field, a million columns, a zip bomb, a file over
the size limit) are made here, in ``tmp_path``.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from audit.models import AuditEntry
from billing_ops.environments import Environment
from billing_ops.models import Job, JobStatus
from billing_ops.services import job_execute
from reconciliation.models import UpsertRun, UpsertRunStatus
from tests.conftest import make_user
from tests.test_upsert import HEADER, existing_line, query, request_upsert, snapshot

# The test environment's database only (fewer to flush after each test); the sweeps over
# every page, which read every environment, take them all.
pytestmark = pytest.mark.django_db(databases=["default", "env_test"])
ALL_DATABASES = pytest.mark.django_db(transaction=True, databases="__all__")

CORPUS = Path(__file__).resolve().parent / "bad_csv"

# file -> what the error must say (the whole "file, line, column: problem" where it has one).
EXPECTED: dict[str, str] = {
    "empty.csv": "empty.csv: the file is empty",
    "only_newline.csv": "only_newline.csv, line 1: the first line is empty; it must be the header row",
    "header_only.csv": "header_only.csv, line 2: the file has a header but no lines",
    "header_only_no_newline.csv": "header_only_no_newline.csv, line 2: the file has a header but no lines",
    "missing_column.csv": "missing_column.csv, line 1: missing column(s): amount",
    "unknown_column.csv": "unknown_column.csv, line 1, column colour: unknown column 'colour'",
    "empty_column_name.csv": "empty_column_name.csv, line 1, column 7: unknown column number 7 (empty name)",
    "duplicate_column.csv": "duplicate_column.csv, line 1, column amount: column 'amount' appears twice",
    "semicolon_delimiter.csv": "semicolon_delimiter.csv, line 1: the header has one column",
    "tab_delimiter.csv": "tab_delimiter.csv, line 1: the header has one column",
    "latin1_header.csv": "latin1_header.csv, line 1: the header row is not valid UTF-8 (byte 0xf3",
    "latin1_value.csv": "latin1_value.csv, line 3, column description: is not valid UTF-8 (byte 0xfc;",
    "utf16le_bom.csv": "utf16le_bom.csv, line 1: this is UTF-16 (little-endian) text, not a UTF-8 CSV file",
    "utf16be_bom.csv": "utf16be_bom.csv, line 1: this is UTF-16 (big-endian) text, not a UTF-8 CSV file",
    "nul_in_header.csv": "nul_in_header.csv, line 1: the header row contains NUL bytes",
    "nul_in_value.csv": "nul_in_value.csv, line 3, column description: contains a NUL byte",
    "unterminated_quote_header.csv": "unterminated_quote_header.csv, line 1: the header row is not valid CSV",
    "unterminated_quote_value.csv": "unterminated_quote_value.csv, line 3: a quoted field opened on this",
    "decimal_comma_quoted.csv": "decimal_comma_quoted.csv, line 3, column amount: is not a plain decimal",
    "decimal_comma_unquoted.csv": "decimal_comma_unquoted.csv, line 3: extra data after last expected column",
    "space_thousands.csv": "space_thousands.csv, line 3, column quantity: is not a plain decimal number",
    "currency_symbol.csv": "currency_symbol.csv, line 3, column amount: is not a plain decimal number",
    "negative_amount.csv": "negative_amount.csv, line 3, column amount: is negative",
    "negative_quantity.csv": "negative_quantity.csv, line 3, column quantity: is negative",
    "huge_amount.csv": "huge_amount.csv, line 3, column amount: is too large for the column (18, 2 digits)",
    "huge_quantity.csv": "huge_quantity.csv, line 3, column quantity: is too large for the column (18, 6",
    "nan_amount.csv": "nan_amount.csv, line 3, column amount: is not a number",
    "infinity_quantity.csv": "infinity_quantity.csv, line 3, column quantity: is too large",
    "formula_in_number.csv": "formula_in_number.csv, line 3, column amount: is not a plain decimal number",
    "too_many_fields.csv": "too_many_fields.csv, line 3: extra data after last expected column",
    "too_few_fields.csv": 'too_few_fields.csv, line 3: missing data for column "amount"',
    "empty_required_value.csv": "empty_required_value.csv, line 3, column unit_id: is missing (empty)",
    "blank_required_value.csv": "blank_required_value.csv, line 3, column line_type: is empty",
    "empty_number.csv": "empty_number.csv, line 3, column quantity: is missing (empty)",
    "blank_line_inside.csv": "blank_line_inside.csv, line 3: the line is empty",
    # As the run folder's validation (reconciliation.artifacts) says too: an empty line is an error.
    "trailing_empty_lines.csv": "trailing_empty_lines.csv, line 4: the line is empty",
    "trailing_empty_lines_crlf.csv": "trailing_empty_lines_crlf.csv, line 3: the line is empty",
    "crlf_then_lf.csv": "crlf_then_lf.csv, line 3: its line ending differs from the first data line's",
    "lf_then_crlf.csv": "lf_then_crlf.csv, line 3: its line ending differs from the first data line's",
    "value_too_long.csv": "value_too_long.csv, line 3, column line_type: is longer than 100 characters",
    "zip_named_csv.csv": "zip_named_csv.csv, line 1: this is a ZIP archive, not a UTF-8 CSV file",
    "gzip_named_csv.csv": "gzip_named_csv.csv, line 1: this is a gzip archive, not a UTF-8 CSV file",
    "pdf_named_csv.csv": "pdf_named_csv.csv, line 1: this is a PDF document, not a UTF-8 CSV file",
}
# ok_ files: the contract's edge cases, accepted -> the lines they insert.
ACCEPTED: dict[str, int] = {
    "ok_utf8_bom.csv": 2,
    "ok_quoted_newline.csv": 2,
    "ok_columns_reordered.csv": 1,
    "ok_limits.csv": 4,
    "ok_formula_cells.csv": 2,
}


def test_the_corpus_is_complete() -> None:
    on_disk = {p.name for p in CORPUS.glob("*.csv")}
    assert on_disk == set(EXPECTED) | set(ACCEPTED)
    assert len(EXPECTED) >= 30


@pytest.fixture
def fresh_env(unprotected_env: Environment, monkeypatch) -> Iterator[Environment]:
    """The test environment, its lines and audit rows emptied before and after (only its own:
    clean_environments would empty all five); jobs run here, in this process, not dispatched."""
    assert unprotected_env.alias == "env_test"
    monkeypatch.setattr("billing_ops.services.job_dispatch", lambda *, job_id: False)
    query(unprotected_env, "TRUNCATE invoice_lines, audit_logs RESTART IDENTITY")
    yield unprotected_env
    query(unprotected_env, "TRUNCATE invoice_lines, audit_logs RESTART IDENTITY")


@pytest.fixture
def env(fresh_env: Environment, settings: Any, tmp_path) -> Environment:
    """With one line in it, and uploads kept in the test's own folder."""
    settings.UPLOAD_DIR = tmp_path / "uploads"
    existing_line(fresh_env, "INV-0", "U-0", "FEE", "already there", "1", "1")
    return fresh_env


def state(env: Environment) -> tuple[Any, ...]:
    """The environment's lines and audit chain (with its head), and the dashboard's runs."""
    return (
        snapshot(env),
        query(env, "SELECT count(*), max(id), (array_agg(hash ORDER BY id DESC))[1] FROM audit_logs"),
        UpsertRun.objects.filter(status=UpsertRunStatus.SUCCEEDED).count(),
    )


def submit(env: Environment, path: Path, *, run_id: str = "bad-1", name: str | None = None) -> str | None:
    """What the operator gets for this file: the refusal or the failed job's error; None if it ran."""
    operator = User.objects.filter(username="op").first() or make_user("op", "Operator")
    try:
        job = request_upsert(operator, env, path, run_id, csv_name=name)
    except ValidationError as exc:
        return " ".join(exc.messages)
    job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    if job.status == JobStatus.SUCCEEDED:
        return None
    assert job.status == JobStatus.FAILED
    assert job.error.endswith("Nothing was committed."), job.error
    return str(job.error)


def assert_refused(env: Environment, path: Path, expected: str, **kwargs: Any) -> str:
    before = state(env)
    error = submit(env, path, **kwargs)
    assert error is not None, f"{path.name} was accepted"
    assert expected in error, error
    assert state(env) == before
    assert not any(Path(django_settings.UPLOAD_DIR).glob("*")), "the upload was left behind"
    return error


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_bad_file_is_refused_by_name_and_writes_nothing(env, name) -> None:
    assert_refused(env, CORPUS / name, EXPECTED[name])


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_the_contracts_edge_cases_are_accepted(env, name) -> None:
    assert submit(env, CORPUS / name) is None
    assert query(env, "SELECT count(*) FROM invoice_lines") == [(1 + ACCEPTED[name],)]


def test_formula_looking_cells_are_stored_verbatim_and_escaped_in_every_csv_export(env) -> None:
    from locks.reports import lock_report, render_csv

    assert submit(env, CORPUS / "ok_formula_cells.csv", name="=cmd|' /C calc'!A0.csv") is None
    stored = query(env, "SELECT invoice_id, unit_id, line_type, description FROM invoice_lines ORDER BY 1")
    assert ("=1+1", "+cmd", "-2", "@SUM(A1)") in stored
    assert ("INV-5", "U-1", "FEE", '=HYPERLINK("http://evil.example","x")') in stored
    audit = query(env, "SELECT new_data->>'invoice_id' FROM audit_logs WHERE new_data->>'unit_id' = '+cmd'")
    assert audit == [("=1+1",)]

    viewer = Client()
    viewer.force_login(make_user("viewer", "Viewer"))
    exports = {
        "audit trail": b"".join(viewer.get("/audit/export.csv").streaming_content).decode(),
        "lock report": render_csv(lock_report([env])),
    }
    assert "=cmd" in exports["audit trail"]  # the upload's name is in the trail, inside JSON
    for what, text in exports.items():
        cells = [cell for row in csv.reader(io.StringIO(text)) for cell in row]
        assert cells, what
        running = [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
        assert running == [], (what, running)


# --- Generated: too big or hostile to keep in the repository -----------------------------------


def test_ten_megabytes_in_one_field(env, tmp_path) -> None:
    path = tmp_path / "huge_field.csv"
    path.write_bytes(HEADER.encode() + b"INV-1,U-1,FEE," + b"d" * (10 * 1024 * 1024) + b",1,1\n")
    assert_refused(env, path, "huge_field.csv, line 2, column description: is longer than 2,000 characters")


def test_a_million_columns(env, tmp_path) -> None:
    wide_header = tmp_path / "wide_header.csv"
    wide_header.write_bytes(b",".join(b"c%d" % n for n in range(1_000_000)) + b"\n")
    assert_refused(env, wide_header, "wide_header.csv, line 1: the header row is longer than 65,536 bytes")
    wide_row = tmp_path / "wide_row.csv"
    wide_row.write_bytes(HEADER.encode() + b"INV-1,U-1,FEE,fee,1,1" + b",x" * 1_000_000 + b"\n")
    assert_refused(env, wide_row, "wide_row.csv, line 2: extra data after last expected column")


def test_a_zip_bomb_named_csv(env, tmp_path) -> None:
    path = tmp_path / "bomb.csv"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("missing_lines.csv", HEADER + "0" * (50 * 1024 * 1024))  # 50 MB, ~50 KB packed
    assert path.stat().st_size < 1024 * 1024
    assert_refused(env, path, "bomb.csv, line 1: this is a ZIP archive, not a UTF-8 CSV file")


def test_a_file_over_the_size_limit(env, tmp_path, settings) -> None:
    settings.RECONCILIATION_MAX_CSV_BYTES = 4096
    path = tmp_path / "big.csv"
    path.write_bytes(HEADER.encode() + b"INV-1,U-1,FEE,fee,1,1\n" * 300)
    assert_refused(env, path, "big.csv: The file is larger than the limit of 4,096 bytes.")


# --- The upload form --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["empty.csv", "utf16le_bom.csv", "duplicate_column.csv", "zip_named_csv.csv", "negative_amount.csv"],
)
def test_the_upload_form_shows_the_error_and_records_no_partial_effect(env, name) -> None:
    operator = make_user("op", "Operator")
    client = Client()
    client.force_login(operator)
    before = state(env)
    upload = SimpleUploadedFile(name, (CORPUS / name).read_bytes(), content_type="text/csv")
    response = client.post(
        f"/environments/{env.key}/reconciliation/upsert/",
        {"csv": upload, "run_id": "web-1", "batch_size": "10"},
    )
    if response.status_code == 302:  # the header was fine: the job finds the bad line
        job = Job.objects.get()
        job_execute(job_id=job.pk, worker="test")
        page = client.get(response["Location"]).content.decode()
        assert response["Location"] == f"/jobs/{job.pk}/"
        assert "line 3, column amount: is negative" in page and "Nothing was committed." in page
        assert UpsertRun.objects.get().status == UpsertRunStatus.FAILED
    else:
        assert response.status_code == 200
        page = response.content.decode()
        expected = EXPECTED[name].replace("'", "&#x27;")
        if name == "empty.csv":  # Django's FileField refuses it first
            expected = "The submitted file is empty."
        assert expected in page
        assert not Job.objects.exists() and not UpsertRun.objects.exists()
    assert state(env) == before


# --- Forms and URLs -----------------------------------------------------------------------------

# SQL and path characters, a NUL, a very long value, numbers no column holds.
HOSTILE = (
    "nope",
    "'; DROP TABLE invoice_lines; --",
    "../../etc/passwd",
    "\x00",
    "x" * 3000,
    "%",
    "99999999999999999999",
    "-1",
)
INVALID = HOSTILE[1:5]  # no field of the dashboard takes these (a run id "nope" is a valid request)


@pytest.fixture
def hostile(unprotected_env: Environment, clean_environments: None, monkeypatch) -> dict[str, Any]:
    """Someone with every role, a job of someone else's awaiting approval, and the state to compare."""
    from billing_ops import services

    monkeypatch.setattr("billing_ops.services.job_dispatch", lambda *, job_id: False)
    existing_line(unprotected_env, "INV-0", "U-0", "FEE", "already there", "1", "1")
    other = make_user("other", "Operator")
    job = services.job_request(actor=other, kind="environment_check", environment=unprotected_env.key)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.AWAITING_APPROVAL)
    job.refresh_from_db()
    client = Client()
    client.force_login(make_user("boss", "Viewer", "Operator", "Approver"))
    return {"env": unprotected_env, "job": job, "client": client}


def everything(env: Environment) -> tuple[Any, ...]:
    return (
        snapshot(env),
        list(Job.objects.values_list("pk", "status", "approved_by")),
        AuditEntry.objects.count(),
        UpsertRun.objects.count(),
    )


def _url_patterns() -> dict[str, list[str]]:
    """url name -> its path parameters."""
    from django.urls import get_resolver

    from tests.test_permissions import MATRIX

    params: dict[str, list[str]] = {}
    for name in MATRIX:
        (possibility, *_), *_ = get_resolver().reverse_dict.getlist(name)
        params[name] = list(possibility[0][1])
    return params


def _url(name: str, params: list[str], values: dict[str, str]) -> str:
    from urllib.parse import quote

    from django.urls import reverse

    marks = {p: (f"777{n}" if p.endswith(("id", "pk")) else f"mark{n}") for n, p in enumerate(params)}
    url = reverse(name, kwargs=marks)
    for param, mark in marks.items():
        url = url.replace(mark, quote(values[param], safe=""))
    return url


@ALL_DATABASES
def test_hostile_path_values_are_refused_without_a_500_and_change_nothing(hostile) -> None:
    """Every URL with a parameter, each parameter hostile in turn (the others valid)."""
    from tests.test_permissions import MATRIX

    env, job, client = hostile["env"], hostile["job"], hostile["client"]
    valid = {"env_key": env.key, "job_id": str(job.pk), "fmt": "json", "backup": "none.dump"}
    before = everything(env)
    answers: dict[str, set[int]] = {}
    for name, params in _url_patterns().items():
        send = client.get if MATRIX[name][0] == "GET" else client.post
        for param in params:
            for value in HOSTILE:
                url = _url(name, params, {**{p: valid.get(p, "1") for p in params}, param: value})
                try:
                    status = send(url).status_code
                except Exception as exc:  # the test client re-raises what would be a 500
                    pytest.fail(f"{MATRIX[name][0]} {url[:120]}: {type(exc).__name__}: {exc}")
                assert status < 500, url
                answers.setdefault(name, set()).add(status)
    assert everything(env) == before, list(Job.objects.values_list("kind", "params"))
    assert answers["environment_detail"] == {404}
    assert answers["job_approve"] <= {302, 403, 404, 405}


# Every query parameter a page reads (filters, paging, the lookup, run ids).
QUERY_KEYS = (
    "q", "run_id", "page", "sort", "environment", "kind", "status", "channel", "entity_type", "min_locks",
    "created_after", "created_before", "lock_kind", "action", "actor", "object_type", "object_id",
    "date_after", "date_before", "per_page",
)  # fmt: skip
QUERY_VALUES = (*HOSTILE[1:5], "99999999999999999999", "-1", "0")


@ALL_DATABASES
def test_hostile_query_strings_are_answered_without_a_500(hostile) -> None:
    from tests.test_permissions import MATRIX

    env, job, client = hostile["env"], hostile["job"], hostile["client"]
    valid = {"env_key": env.key, "job_id": str(job.pk), "fmt": "json", "backup": "none.dump"}
    before = everything(env)
    # /metrics and /healthz read no query; /healthz may answer 503 (a test environment is down).
    pages = [name for name, (method, _roles) in MATRIX.items() if method == "GET"]
    pages = [name for name in pages if name not in ("metrics", "healthz")]
    for name, params in _url_patterns().items():
        if name not in pages:
            continue
        url = _url(name, params, {p: valid.get(p, "1") for p in params})
        for value in QUERY_VALUES:
            try:
                response = client.get(url, dict.fromkeys(QUERY_KEYS, value))
            except Exception as exc:
                pytest.fail(f"GET {url}?...={value[:20]!r}: {type(exc).__name__}: {exc}")
            assert response.status_code < 500, (url, value[:20])
            if response.streaming:  # an export fails while it streams, not before
                b"".join(response.streaming_content)
    assert everything(env) == before, list(Job.objects.values_list("kind", "params"))


# Every field a dashboard form posts, hidden ones included.
FORM_FIELDS = (
    "digest", "comment", "run_id", "reason", "confirmation", "environment", "run_folder", "precheck_job",
    "pid", "backend_start", "runs", "locks", "scope", "filter_query", "back", "next", "language",
    "time_zone", "what", "batch_size", "dry_run", "plan_id", "job_id", "backup",
)  # fmt: skip


@ALL_DATABASES
def test_hostile_form_fields_are_refused_without_a_500_and_change_nothing(hostile) -> None:
    """Every POST of the dashboard (on a real job of someone else's, in a real environment),
    each hostile value in every field at once: refused (4xx, or back with a message), never run."""
    from tests.test_permissions import JOB_REQUESTS, MATRIX

    env, job, client = hostile["env"], hostile["job"], hostile["client"]
    valid = {"env_key": env.key, "job_id": str(job.pk), "fmt": "json", "backup": "none.dump"}
    before = everything(env)
    # Not: signing out, refusing or cancelling (valid with any comment), and the requests
    # that take no field (any POST of them is a valid request).
    posts = [
        name
        for name, (method, _roles) in MATRIX.items()
        if method == "POST"
        and name not in ("logout", "job_refuse", "job_cancel")
        and JOB_REQUESTS.get(name, ("", {"field": ""}))[1]
    ]
    for name, params in _url_patterns().items():
        if name not in posts:
            continue
        url = _url(name, params, {p: valid.get(p, "1") for p in params})
        for value in (*INVALID, "https://evil.example/"):
            try:
                response = client.post(url, dict.fromkeys(FORM_FIELDS, value))
            except Exception as exc:
                pytest.fail(f"POST {url} ...={value[:20]!r}: {type(exc).__name__}: {exc}")
            assert response.status_code in (200, 302, 400, 403, 404), (url, value[:20], response.status_code)
            assert "evil.example" not in response.get("Location", ""), url
    # Only the read-only post-upsert check takes any text as a run id (the old script's runs
    # had any; it is a bound parameter): never a NUL or an over-long one.
    queued = Job.objects.exclude(pk=job.pk)
    assert {j.kind for j in queued} <= {"upsert_verify"}
    assert all("\x00" not in j.params["run_id"] and len(j.params["run_id"]) <= 200 for j in queued)
    assert (snapshot(env), before[1]) == (
        before[0],
        list(Job.objects.filter(pk=job.pk).values_list("pk", "status", "approved_by")),
    )


def test_a_rollback_refuses_tampered_hidden_fields_and_a_replayed_approval(fresh_env, tmp_path) -> None:
    from reconciliation.rollback import ROLLBACK_KIND, rollback_preview
    from tests.test_upsert import run, write_csv

    env = fresh_env
    run(env, write_csv(tmp_path, "INV-1,U-1,FEE,fee,1,1\nINV-2,U-1,FEE,fee,2,2\n"), run_id="fix-1")
    operator, approver = Client(), Client()
    operator.force_login(make_user("op", "Operator"))
    approver.force_login(make_user("ap", "Approver"))
    url = f"/environments/{env.key}/reconciliation/rollback/"
    digest = rollback_preview(env, "fix-1").digest
    good = {"run_id": "fix-1", "digest": digest, "reason": "the wrong file", "confirmation": ""}
    before = everything(env)
    for field, value in [
        ("digest", "0" * 64),
        ("digest", digest[:-1] + ("0" if digest[-1] != "0" else "1")),
        ("digest", "\x00"),
        ("run_id", "fix-2"),
        ("run_id", "'; DROP TABLE invoice_lines; --"),
        ("run_id", "../../etc/passwd"),
        ("run_id", "\x00"),
        ("run_id", "x" * 3000),
    ]:
        response = operator.post(url, {**good, field: value})
        page = response.content.decode()
        assert response.status_code == 200, (field, value[:20])
        shown = (
            "does not match a preview",
            "data changed since your preview",
            "no audit rows",
            'class="error"',
        )
        assert any(text in page for text in shown), (field, value[:20], page[page.find("<main") :])
        assert everything(env) == before, (field, value[:20])

    response = operator.post(url, good)
    job = Job.objects.get(kind=ROLLBACK_KIND)
    assert response.status_code == 302 and job.status == JobStatus.AWAITING_APPROVAL
    # An approval of other parameters (a tampered digest) is refused.
    page = approver.post(f"/jobs/{job.pk}/approve/", {"digest": "0" * 64}, follow=True).content.decode()
    job.refresh_from_db()
    assert job.status == JobStatus.AWAITING_APPROVAL and job.approved_by is None, page
    approver.post(f"/jobs/{job.pk}/approve/", {"digest": job.params_digest})
    job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert query(env, "SELECT count(*) FROM invoice_lines") == [(0,)]
    after = everything(env)
    # The same approval again: refused, and the job does not run twice.
    replay = approver.post(f"/jobs/{job.pk}/approve/", {"digest": job.params_digest}, follow=True)
    assert replay.status_code == 200 and "not awaiting approval" in replay.content.decode()
    job_execute(job_id=job.pk, worker="test")  # a duplicated message finds nothing to do
    assert everything(env) == after
    assert AuditEntry.objects.filter(action="job.approved", object_id=str(job.pk)).count() <= 1
