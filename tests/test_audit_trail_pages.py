"""The dashboard's audit trail page (django-tables2 + django-filter) and its CSV export."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import pytest
from django.test import Client

from audit.chain import format_created_at
from audit.models import AuditEntry
from audit.services import SYSTEM_SCHEDULER, audit_record
from audit.tables import AUDIT_ENTRIES_PER_PAGE
from tests.conftest import make_user
from tests.test_dashboard_audit import forge, tampering

pytestmark = pytest.mark.django_db


@pytest.fixture
def trail(db: None) -> dict[str, AuditEntry]:
    operator = make_user("operator1", "Operator")
    approver = make_user("approver1", "Approver")
    return {
        "requested": audit_record(
            actor=operator, action="job.requested", environment="dev", object_type="job", object_id=7
        ),
        "approved": audit_record(
            actor=approver, action="job.approved", environment="dev", object_type="job", object_id=7
        ),
        "released": audit_record(
            actor=SYSTEM_SCHEDULER,
            action="locks.released",
            environment="test",
            object_type="run",
            object_id="1620",
            params={"note": '=HYPERLINK("http://evil")'},
            outcome={"released": 1291},
        ),
        "backend": audit_record(actor=approver, action="backend.cancelled", environment="test"),
    }


def rows_of(client: Client, query: str = "") -> list[int]:
    """The entry ids the page shows, in order (the id column's cells)."""
    import re

    html = client.get(f"/audit/{query}").content.decode()
    return [int(n) for n in re.findall(r'<td data-entry="(\d+)"', html)]


@pytest.mark.parametrize("role", ["Viewer", "Operator", "Approver"])
def test_every_role_reads_the_trail_newest_first(trail, client_for, role: str) -> None:
    client = client_for(make_user("reader", role))
    response = client.get("/audit/")
    assert response.status_code == 200
    assert rows_of(client) == [e.pk for e in reversed(trail.values())]
    html = response.content.decode()
    assert 'href="/jobs/7/"' in html  # a job entry links to its job
    assert "run:1620" in html and "Audit trail" in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("?action=job.approved", ["approved"]),
        ("?action=backend.cancelled", ["backend"]),  # not a named action: still a choice
        ("?actor=approver1", ["backend", "approved"]),
        ("?environment=test", ["backend", "released"]),
        ("?object_type=job&object_id=7", ["approved", "requested"]),
        ("?object_type=run&object_id=7", []),
        ("?actor=approver1&environment=dev", ["approved"]),
    ],
)
def test_the_filters_select_entries(trail, client_for, query: str, expected: list[str]) -> None:
    client = client_for(make_user("viewer1", "Viewer"))
    assert rows_of(client, query) == [trail[name].pk for name in expected]


def test_the_date_range_is_inclusive_days(db: None, client_for) -> None:
    days = [datetime(2026, 3, d, 12, 0, tzinfo=UTC) for d in (1, 2, 3)]
    # Entries of other days than today, written as an intruder would (each starting a chain).
    with tampering(linear=False) as cursor:
        ids = [forge(cursor, created_at=at, previous_hash=None) for at in days]
    client = client_for(make_user("viewer1", "Viewer"))
    assert rows_of(client, "?date_after=2026-03-02&date_before=2026-03-02") == [ids[1]]
    assert rows_of(client, "?date_after=2026-03-02") == [ids[2], ids[1]]
    assert rows_of(client, "?date_before=2026-03-01") == [ids[0]]


def test_an_invalid_filter_is_ignored_and_said_so(trail, client_for) -> None:
    client = client_for(make_user("viewer1", "Viewer"))
    response = client.get("/audit/?action=no.such&date_after=yesterday")
    assert "Some filters were invalid" in response.content.decode()
    assert len(rows_of(client, "?action=no.such&date_after=yesterday")) == len(trail)


def test_it_sorts_by_time_and_pages_through(db: None, client_for) -> None:
    for n in range(AUDIT_ENTRIES_PER_PAGE + 5):
        audit_record(actor=SYSTEM_SCHEDULER, action="job.requested", params={"n": n})
    ordered = list(AuditEntry.objects.order_by("created_at").values_list("pk", flat=True))
    client = client_for(make_user("viewer1", "Viewer"))
    assert rows_of(client) == ordered[::-1][:AUDIT_ENTRIES_PER_PAGE]
    assert rows_of(client, "?page=2") == ordered[::-1][AUDIT_ENTRIES_PER_PAGE:]
    assert rows_of(client, "?sort=created_at") == ordered[:AUDIT_ENTRIES_PER_PAGE]


# --- The CSV export -------------------------------------------------------------------------------


def export(client: Client, query: str = "") -> tuple[Any, list[list[str]]]:
    response = client.get(f"/audit/export.csv{query}")
    body = b"".join(response.streaming_content).decode()
    return response, list(csv.reader(io.StringIO(body)))


def test_the_export_is_the_current_filter_streamed(trail, client_for) -> None:
    client = client_for(make_user("viewer1", "Viewer"))
    page = client.get("/audit/?environment=test&sort=created_at&page=1").content.decode()
    assert 'href="/audit/export.csv?environment=test"' in page  # the filter, not the paging

    response, rows = export(client, "?environment=test")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="billing-ops-audit-trail-')
    assert rows[0][:4] == ["id", "created_at", "actor", "action"]
    released, backend = trail["released"], trail["backend"]
    assert [row[0] for row in rows[1:]] == [str(backend.pk), str(released.pk)]
    row = dict(zip(rows[0], rows[2], strict=True))
    assert row["created_at"] == format_created_at(released.created_at)
    assert (row["actor"], row["object_type"], row["object_id"]) == ("system:scheduler", "run", "1620")
    assert row["hash"] == released.hash and row["previous_hash"] == trail["approved"].hash

    _response, everything = export(client)
    assert len(everything) == 1 + len(trail)


def test_the_export_escapes_cells_a_spreadsheet_would_run(db: None, client_for) -> None:
    audit_record(actor=SYSTEM_SCHEDULER, action="job.requested", object_type="job", object_id="=1+1")
    audit_record(actor=SYSTEM_SCHEDULER, action="job.requested", object_type="@SUM(A1)", object_id="-2")
    _response, rows = export(client_for(make_user("viewer1", "Viewer")))
    cells = {cell for row in rows[1:] for cell in row}
    assert {"'=1+1", "'@SUM(A1)", "'-2"} <= cells
    assert not {"=1+1", "@SUM(A1)", "-2"} & cells


def test_the_export_is_for_signed_in_roles_only(trail, client) -> None:
    assert client.get("/audit/export.csv")["Location"].startswith("/login/")
    client.force_login(make_user("nobody1"))
    assert client.get("/audit/export.csv").status_code == 403


def test_the_trail_links_to_the_verification_and_back(db: None, client_for) -> None:
    client = client_for(make_user("viewer1", "Viewer"))
    assert 'href="/audit/chain/"' in client.get("/audit/").content.decode()
    assert 'href="/audit/"' in client.get("/audit/chain/").content.decode()
    assert 'href="/audit/"' in client.get("/").content.decode()  # the base navigation


def test_an_entry_is_shown_with_its_time_to_the_microsecond(db: None, client_for) -> None:
    entry = audit_record(actor=SYSTEM_SCHEDULER, action="job.requested")
    html = client_for(make_user("viewer1", "Viewer")).get("/audit/").content.decode()
    assert f"{entry.created_at:%Y-%m-%d %H:%M:%S.%f}" in html  # pages show UTC in the tests
