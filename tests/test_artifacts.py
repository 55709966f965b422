"""Artifact validation of a reconciliation run folder (runbook §1.3)."""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections

from billing_ops import services
from billing_ops.demo import SAMPLE_RUN_FOLDERS_DIR, _insert_invoice_lines, reconciliation_samples_ensure
from billing_ops.models import Job, JobStatus
from reconciliation import artifacts
from reconciliation.artifacts import ArtifactError, artifacts_validate, run_folder_path, run_folders_list

HEADER = "invoice_id,unit_id,line_type,description,quantity,amount"
SAMPLE = "demo-20261121-fix1"


def make_folder(name: str, csv_text: str | bytes | None, summary: object = None, **extra: str) -> Path:
    folder = Path(settings.RECONCILIATIONS_DIR) / name
    folder.mkdir(parents=True)
    if csv_text is not None:
        data = csv_text.encode() if isinstance(csv_text, str) else csv_text
        (folder / "missing_lines.csv").write_bytes(data)
    if summary is not None:
        text = summary if isinstance(summary, str) else json.dumps(summary)
        (folder / "summary.json").write_text(text)
    for file_name, text in extra.items():
        (folder / file_name).write_text(text)
    return folder


def problems(report: dict) -> list[tuple]:
    return [(p["file"], p["line"], p["column"], p["message"]) for p in report["problems"]]


def test_the_sample_folder_passes(tmp_path) -> None:
    reconciliation_samples_ensure(target=tmp_path)
    report = artifacts_validate(tmp_path / SAMPLE)
    assert report["passed"], problems(report)
    assert report["message"] == "Artifact validation passed"
    assert report["missing_lines_count"] == 20 and report["csv"]["data_rows"] == 20
    # One description holds a quoted newline: 20 records on 21 lines after the header.
    assert report["csv"]["physical_lines"] == 22
    assert [f["name"] for f in report["files"]] == ["missing_lines.csv", "summary.json"]
    assert all(f["required"] and f["size_bytes"] > 0 for f in report["files"])


def test_records_are_counted_with_a_csv_parser_not_by_lines() -> None:
    csv_text = f'{HEADER}\nINV-1,U-1,ENERGY,"two\nlines, and a comma",1,2\nINV-2,U-1,FEE,"say ""hi""",1,2\n'
    assert artifacts_validate(
        make_folder("by-records", csv_text, {"run_id": "by-records", "missing_lines_count": 2})
    )["passed"]
    report = artifacts_validate(
        make_folder("by-lines", csv_text, {"run_id": "by-lines", "missing_lines_count": 3})
    )
    assert not report["passed"]
    assert problems(report) == [
        (
            "summary.json",
            None,
            "missing_lines_count",
            "missing_lines_count is 3 but missing_lines.csv has 2 data rows.",
        )
    ]


def test_a_bom_crlf_and_any_column_order_are_accepted() -> None:
    csv_text = (
        "\ufeffamount,quantity,description,line_type,unit_id,invoice_id\r\n2.50,1,Fee,FEE,U-1,INV-1\r\n"
    )
    report = artifacts_validate(
        make_folder("bom", csv_text.encode("utf-8"), {"run_id": "bom", "missing_lines_count": 1})
    )
    assert report["passed"], problems(report)
    assert report["csv"]["bom"] is True and report["csv"]["line_endings"] == "CRLF"
    assert report["csv"]["header"][0] == "amount"  # the BOM is not part of the first name


def test_header_problems_are_listed_by_column() -> None:
    csv_text = "invoice_id,unit_id,line_type,Description,quantity,quantity,extra\nA,B,C,D,1,1,x\n"
    report = artifacts_validate(
        make_folder("header", csv_text, {"run_id": "header", "missing_lines_count": 1})
    )
    assert not report["passed"]
    assert problems(report) == [
        ("missing_lines.csv", 1, "Description", "Unknown column. Did you mean description? Names are exact."),
        ("missing_lines.csv", 1, "quantity", "Column named more than once in the header."),
        ("missing_lines.csv", 1, "extra", "Unknown column."),
        ("missing_lines.csv", 1, "description", "Required column is missing from the header."),
        ("missing_lines.csv", 1, "amount", "Required column is missing from the header."),
    ]
    assert report["csv"]["missing_columns"] == ["description", "amount"]
    assert report["csv"]["unknown_columns"] == ["Description", "extra"]


def test_bad_values_are_reported_on_the_line_the_record_starts() -> None:
    csv_text = (
        f"{HEADER}\n"
        'INV-1,U-1,ENERGY,"spans\ntwo lines",1.5,2\n'  # lines 2-3
        "INV-2,U-1,ENERGY,Energy,1e3,1 000\n"  # line 4
        "INV-3,,FEE,Fee,1,12345678901234567.00\n"  # line 5
        "\n"  # line 6
        "INV-4,U-1,FEE,Fee,1\n"  # line 7
        "INV-5,U-1,FEE,Fee,NaN, -3.50 \n"  # line 8
        "INV-6,U-1,FEE,Fee,1234567890123,1\n"  # line 9
    )
    report = artifacts_validate(
        make_folder("values", csv_text, {"run_id": "values", "missing_lines_count": 7})
    )
    assert problems(report) == [
        ("missing_lines.csv", 4, "amount", "'1 000' is not a decimal number."),
        ("missing_lines.csv", 5, "unit_id", "Empty; a value is required."),
        ("missing_lines.csv", 5, "amount", "12345678901234567.00 does not fit numeric(18,2)."),
        ("missing_lines.csv", 6, None, "Empty line."),
        ("missing_lines.csv", 7, None, "5 fields where the header has 6."),
        ("missing_lines.csv", 8, "quantity", "'NaN' is not a decimal number."),
        ("missing_lines.csv", 8, "amount", "-3.50 is negative."),
        ("missing_lines.csv", 9, "quantity", "1234567890123 does not fit numeric(18,6)."),
    ]
    assert report["csv"]["data_rows"] == 7 and report["problems_total"] == 8


def test_bad_utf8_is_reported_on_its_line_and_stops_the_count() -> None:
    data = f"{HEADER}\nINV-1,U-1,FEE,Fee,1,2\nINV-2,U-1,FEE,Caf\xe9,1,2\n".encode("latin-1")
    report = artifacts_validate(make_folder("latin1", data, {"run_id": "latin1", "missing_lines_count": 2}))
    assert problems(report) == [
        ("missing_lines.csv", 3, None, "Not valid UTF-8 (byte 0xe9 at byte 18 of the line); reading stopped.")
    ]
    assert report["csv"]["complete"] is False  # so the count is not compared


def test_summary_problems() -> None:
    cases = {
        "no-summary": (None, [("summary.json", None, None, "Required file is missing.")]),
        "not-json": ('{"run_id": "not-json",\n "missing_lines_count": }', "Not valid JSON"),
        "not-object": ("[1, 2]", [("summary.json", 1, None, "Must be a JSON object.")]),
        "wrong-id": (
            {"run_id": "other", "missing_lines_count": 0},
            [("summary.json", None, "run_id", "run_id 'other' is not the folder's name 'wrong-id'.")],
        ),
        "count-text": (
            {"run_id": "count-text", "missing_lines_count": "0"},
            [("summary.json", None, "missing_lines_count", 'Must be a non-negative integer, not "0".')],
        ),
        "no-keys": (
            {},
            [
                ("summary.json", None, "run_id", "Required key is missing."),
                ("summary.json", None, "missing_lines_count", "Required key is missing."),
            ],
        ),
    }
    for name, (summary, expected) in cases.items():
        report = artifacts_validate(make_folder(name, f"{HEADER}\n", summary))
        assert not report["passed"], name
        if isinstance(expected, str):
            [(file, line, column, message)] = problems(report)
            assert (file, line, column) == ("summary.json", 2, None) and message.startswith(expected), message
        else:
            assert problems(report) == expected, name


def test_missing_and_symlinked_files_are_not_read(tmp_path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("root:x:0:0\n")
    folder = make_folder("links", None, None, **{"notes.txt": "hello"})
    os.symlink(secret, folder / "missing_lines.csv")
    report = artifacts_validate(folder)
    assert (
        "missing_lines.csv",
        None,
        None,
        "Is a symbolic link, not a regular file of the run folder; it is not read.",
    ) in problems(report)
    assert ("summary.json", None, None, "Required file is missing.") in problems(report)
    assert "root" not in json.dumps(report)
    assert {"name": "notes.txt", "kind": "file", "size_bytes": 5, "required": False} in report["files"]


def test_an_empty_csv_is_a_problem() -> None:
    report = artifacts_validate(make_folder("empty", "", {"run_id": "empty", "missing_lines_count": 0}))
    assert problems(report) == [("missing_lines.csv", 1, None, "The file is empty: no header row.")]


def test_only_plain_subfolders_are_listed_and_resolved(tmp_path) -> None:
    base = Path(settings.RECONCILIATIONS_DIR)
    make_folder("run-a", f"{HEADER}\n")
    (base / ".hidden").mkdir()
    (base / "a-file.csv").write_text("x")
    os.symlink(tmp_path, base / "linked")
    assert [f.name for f in run_folders_list()] == ["run-a"]
    assert run_folder_path("run-a") == base / "run-a"
    for name in ("..", "../run-a", "run-a/..", "/etc", ".hidden", "linked", "a-file.csv", "nope", ""):
        with pytest.raises(ArtifactError):
            run_folder_path(name)


def test_samples_are_copied_once_and_never_over_an_operators_folder(tmp_path) -> None:
    assert reconciliation_samples_ensure(target=tmp_path) == [SAMPLE]
    (tmp_path / SAMPLE / "summary.json").write_text("{}")
    assert reconciliation_samples_ensure(target=tmp_path) == []
    assert (tmp_path / SAMPLE / "summary.json").read_text() == "{}"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.parametrize("demo_lines", [2_000, 50_000])
def test_the_sample_fits_the_demos_invoice_lines(unprotected_env, clean_environments, demo_lines) -> None:
    """8 of its 20 lines are lines every demo environment has (4 exactly as stored, 4 in
    other spellings with another amount), the other 12 are new."""
    import csv

    with connections[unprotected_env.alias].cursor() as cursor:
        _insert_invoice_lines(cursor, unprotected_env, demo_lines)
        rows = list(csv.DictReader((SAMPLE_RUN_FOLDERS_DIR / SAMPLE / "missing_lines.csv").open(newline="")))
        identical = spelled_differently = new = 0
        for row in rows:
            cursor.execute(
                "SELECT description, quantity, amount FROM public.invoice_lines WHERE invoice_id = %s"
                " AND unit_id = %s AND line_type = %s AND normalized_description ="
                r" regexp_replace(lower(trim(%s::text)), '\s+', ' ', 'g')",
                [row["invoice_id"], row["unit_id"], row["line_type"], row["description"]],
            )
            found = cursor.fetchone()
            if found is None:
                new += 1
                assert re.fullmatch(r"INV-\d{8}", row["invoice_id"]) and re.fullmatch(
                    r"UNIT-\d{6}", row["unit_id"]
                )
            elif found == (row["description"], Decimal(row["quantity"]), Decimal(row["amount"])):
                identical += 1
            else:
                assert found[0] != row["description"] and found[2] != Decimal(row["amount"])
                spelled_differently += 1
    assert (identical, spelled_differently, new) == (4, 4, 12)


@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.usefixtures("inline_jobs")
def test_an_operator_validates_a_listed_folder_and_a_viewer_sees_the_result(
    client_for, operator, viewer, unprotected_env
) -> None:
    reconciliation_samples_ensure(target=Path(settings.RECONCILIATIONS_DIR))
    make_folder(
        "broken", f"{HEADER}\nINV-1,U-1,FEE,Fee,one,2\n", {"run_id": "broken", "missing_lines_count": 1}
    )
    client = client_for(operator)
    home = client.get(f"/environments/{unprotected_env.key}/reconciliation/").content.decode()
    assert f'<option value="{SAMPLE}">' in home and '<option value="broken">' in home
    url = f"/environments/{unprotected_env.key}/reconciliation/artifacts/validate/"
    response = client.post(url, {"run_folder": SAMPLE})
    good = Job.objects.get()
    assert response["Location"] == f"/jobs/{good.pk}/" and good.params == {"run_folder": SAMPLE}
    assert services.job_execute(job_id=good.pk, worker="test") == JobStatus.SUCCEEDED
    messages = [line.message for line in Job.objects.get(pk=good.pk).log_lines.all()]
    assert "Artifact validation passed" in messages and "missing_lines_count: 20" in messages
    client.post(url, {"run_folder": "broken"})
    bad = Job.objects.latest("pk")
    services.job_execute(job_id=bad.pk, worker="test")
    assert Job.objects.get(pk=bad.pk).result["passed"] is False
    page = client_for(viewer).get(f"/jobs/{bad.pk}/").content.decode()
    assert (
        "Artifact validation failed: 1 problem(s)" in page
        and "&#x27;one&#x27; is not a decimal number." in page
    )
    home = client_for(viewer).get(f"/environments/{unprotected_env.key}/reconciliation/").content.decode()
    assert 'data-passed="yes"' in home and 'data-passed="no"' in home
    assert "Validate artifacts" not in home  # no form for viewers


@pytest.mark.django_db(databases="__all__")
def test_a_path_is_never_accepted_for_a_run_folder(client_for, operator, unprotected_env) -> None:
    make_folder("run-a", f"{HEADER}\n")
    url = f"/environments/{unprotected_env.key}/reconciliation/artifacts/validate/"
    for value in ("../run-a", "/etc", "run-a/../run-a", "..", "nope"):
        response = client_for(operator).post(url, {"run_folder": value}, follow=True)
        assert "Choose one of the listed run folders." in response.content.decode()
    assert Job.objects.count() == 0
    with pytest.raises(ArtifactError):
        artifacts.artifact_validate_request(actor=operator, env=unprotected_env, run_folder="../run-a")
