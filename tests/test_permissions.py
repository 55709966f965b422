"""Every URL x anonymous / no role / viewer / operator / approver, checked against the database.

The matrix must name every URL pattern: adding a view without adding it here fails
test_the_matrix_covers_every_url.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from billing_ops import services
from billing_ops.models import Job, JobStatus, UserPreference
from tests.conftest import make_user
from tests.test_restore import make_verified_backup

pytestmark = pytest.mark.django_db(databases="__all__")

ROLES = ("anonymous", "nobody", "viewer", "operator", "approver")
READ_ONLY = {"anonymous": "login", "nobody": 403, "viewer": 200, "operator": 200, "approver": 200}
OPERATOR_ONLY = {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 302, "approver": 403}
OPERATOR_OR_APPROVER = {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 302, "approver": 302}
# POSTs that queue a job of this kind once allowed, with the form data that makes them valid.
JOB_REQUESTS: dict[str, tuple[str, dict[str, str]]] = {
    "environment_check_request": ("environment_check", {}),  # + the environment (below)
    "duplicate_precheck_request": ("duplicate_precheck", {}),
    "index_check_request": ("index_check", {}),
    "index_create_request": ("index_create", {}),
    "backup_request": ("database_backup", {}),
    "artifact_validate_request": ("artifact_validate", {"run_folder": "run-1"}),
    "upsert_verify_request": ("upsert_verify", {"run_id": "manual-20260208-fix42"}),
    # + the environment's label typed, and a verified backup of it in the URL (below)
    "backup_restore": ("database_restore", {"reason": "The upsert went wrong"}),
    "environment_chain_verify": ("chain_verify", {}),
    "dashboard_chain_verify": ("chain_verify", {}),
}

# url name -> (method, expected outcome per role). "login" = redirect to the login page.
MATRIX: dict[str, tuple[str, dict[str, Any]]] = {
    "overview": ("GET", READ_ONLY),
    "stuck_runs": ("GET", READ_ONLY),
    "suspicious_runs": ("GET", READ_ONLY),
    "run_detail": ("GET", {**READ_ONLY, "viewer": 404, "operator": 404, "approver": 404}),
    "locks_without_run": ("GET", READ_ONLY),
    "procedure": ("GET", READ_ONLY),
    "lock_lookup": ("GET", READ_ONLY),
    "report_download": ("GET", READ_ONLY),
    "alert_list": ("GET", READ_ONLY),
    "cleanup_schedule": ("GET", READ_ONLY),
    "release_preview": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 302, "approver": 403},
    ),
    "release_plan": ("GET", {**READ_ONLY, "viewer": 404, "operator": 404, "approver": 404}),
    "release_confirm": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 404, "approver": 403},
    ),
    "release_restore": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 403, "approver": 404},
    ),
    "alert_acknowledge": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 404, "approver": 404},
    ),
    "metrics": ("GET", {"anonymous": 401, "nobody": 401, "viewer": 200, "operator": 200, "approver": 200}),
    "environment_detail": ("GET", READ_ONLY),
    "reconciliation_home": ("GET", READ_ONLY),
    "upsert_runs": ("GET", READ_ONLY),
    "rollback_preview": ("GET", READ_ONLY),  # its POST (a request): tests/test_rollback.py
    "upsert_audit_rows": ("GET", {**READ_ONLY, "viewer": 404, "operator": 404, "approver": 404}),
    "upsert_new": (
        "GET",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 200, "approver": 403},
    ),
    "duplicate_precheck_request": ("POST", OPERATOR_ONLY),
    # No precheck job named: refused with a message (302) once allowed.
    "duplicate_resolve_request": ("POST", OPERATOR_ONLY),
    "index_check_request": ("POST", OPERATOR_ONLY),
    "index_create_request": ("POST", OPERATOR_ONLY),
    "invoice_lines_sessions": ("GET", READ_ONLY),
    # No session named: refused with a message (302) once allowed.
    "session_signal": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 403, "approver": 302},
    ),
    "backup_list": ("GET", READ_ONLY),
    "backup_request": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 302, "approver": 403},
    ),
    "artifact_validate_request": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 302, "approver": 403},
    ),
    "upsert_verify_request": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 302, "approver": 403},
    ),
    # Approvers only (the GET form likewise, tested in test_restore.py).
    "backup_restore": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 403, "approver": 302},
    ),
    "audit_trail": ("GET", READ_ONLY),
    "audit_trail_export": ("GET", READ_ONLY),
    "dashboard_chain": ("GET", READ_ONLY),
    "environment_chain": ("GET", READ_ONLY),
    "dashboard_chain_verify": ("POST", OPERATOR_OR_APPROVER),
    "environment_chain_verify": ("POST", OPERATOR_OR_APPROVER),
    "job_list": ("GET", READ_ONLY),
    "approval_list": ("GET", READ_ONLY),
    "notification_list": ("GET", READ_ONLY),
    "job_detail": ("GET", READ_ONLY),
    "job_status": ("GET", READ_ONLY),
    "environment_check_request": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 302, "approver": 403},
    ),
    "job_approve": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 403, "approver": 302},
    ),
    "job_refuse": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 403, "approver": 302},
    ),
    "job_cancel": (
        "POST",
        {"anonymous": "login", "nobody": 403, "viewer": 403, "operator": 403, "approver": 302},
    ),
    # Everyone's own language and time zone: any signed-in user; the language also before sign-in.
    "preference_edit": (
        "GET",
        {"anonymous": "login", "nobody": 200, "viewer": 200, "operator": 200, "approver": 200},
    ),
    "language_set": (
        "POST",
        {"anonymous": 302, "nobody": 302, "viewer": 302, "operator": 302, "approver": 302},
    ),
    "login": ("GET", {"anonymous": 200, "nobody": 302, "viewer": 302, "operator": 302, "approver": 302}),
    "logout": ("POST", {"anonymous": 302, "nobody": 302, "viewer": 302, "operator": 302, "approver": 302}),
    "healthz": (
        "GET",
        {
            "anonymous": (200, 503),
            "nobody": (200, 503),
            "viewer": (200, 503),
            "operator": (200, 503),
            "approver": (200, 503),
        },
    ),
}


# Path parameters: the environment and job at hand; any other object does not exist, so an
# allowed request answers 404 (what such a view does with the object is tested elsewhere).
NO_SUCH_OBJECT = 424242
NO_SUCH_JOB = {"release_restore"}  # needs a finished release job: 404 once allowed


def url_kwargs(name: str, *, env_key: str, job_id: int) -> dict[str, Any]:
    (possibility, *_), *_ = get_resolver().reverse_dict.getlist(name)
    kwargs: dict[str, Any] = {}
    for param in possibility[0][1]:
        if param == "env_key":
            kwargs[param] = env_key
        elif param == "fmt":
            kwargs[param] = "json"
        elif param == "job_id" and name not in NO_SUCH_JOB:
            kwargs[param] = job_id
        elif param == "backup":  # made by make_verified_backup
            kwargs[param] = f"backup_{env_key}_20260208_140000.dump"
        else:
            kwargs[param] = NO_SUCH_OBJECT
    return kwargs


def all_url_names() -> set[str]:
    names: set[str] = set()

    def walk(patterns: list[Any]) -> None:
        for p in patterns:
            if isinstance(p, URLResolver):
                walk(p.url_patterns)
            elif isinstance(p, URLPattern) and p.name:
                names.add(p.name)

    walk(get_resolver().url_patterns)
    return names


def test_the_matrix_covers_every_url() -> None:
    assert all_url_names() == set(MATRIX)


@pytest.fixture
def people(db: None) -> dict[str, User | None]:
    return {
        "anonymous": None,
        "nobody": make_user("nobody1"),
        "viewer": make_user("viewer1", "Viewer"),
        "operator": make_user("operator1", "Operator"),
        "approver": make_user("approver1", "Approver"),
    }


def waiting_job(requester: User, env_key: str) -> Job:
    """A job awaiting approval, requested by someone other than the approver under test."""
    job = services.job_request(actor=requester, kind="environment_check", environment=env_key)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.AWAITING_APPROVAL)
    job.refresh_from_db()
    return job


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name", sorted(MATRIX))
def test_permission_matrix(
    name: str, role: str, people, unprotected_env, django_capture_on_commit_callbacks, settings
) -> None:
    method, expected_by_role = MATRIX[name]
    expected = expected_by_role[role]
    requester = make_user("requester", "Operator")
    job = waiting_job(requester, unprotected_env.key)
    if name == "job_cancel" and role == "operator":
        pass  # someone else's job: an operator may cancel only their own (tested below)
    kwargs = url_kwargs(name, env_key=unprotected_env.key, job_id=job.pk)
    from django.urls import reverse

    url = reverse(name, kwargs=kwargs)
    client = Client()
    if people[role] is not None:
        client.force_login(people[role])
    data: dict[str, str] = {}
    if name in JOB_REQUESTS:
        data = dict(JOB_REQUESTS[name][1])
        (settings.RECONCILIATIONS_DIR / "run-1").mkdir(parents=True)
    if name == "environment_check_request":
        data = {"environment": unprotected_env.key}
    if "backup" in kwargs:
        assert kwargs["backup"] == make_verified_backup(unprotected_env)
        data["confirmation"] = unprotected_env.label
    if name in ("job_approve", "job_refuse"):
        data = {"digest": job.params_digest, "comment": "ok"}
    if name == "language_set":
        data = {"language": "ka"}
    jobs_before = Job.objects.count()
    with django_capture_on_commit_callbacks(execute=False):
        response = client.get(url) if method == "GET" else client.post(url, data)

    if expected == "login":
        assert response.status_code == 302 and response["Location"].startswith("/login/")
    elif isinstance(expected, tuple):
        assert response.status_code in expected
    else:
        assert response.status_code == expected, response.content[:500]

    job.refresh_from_db()
    allowed = expected in (200, 302) and role not in ("anonymous",)
    if name in JOB_REQUESTS:
        assert Job.objects.count() == jobs_before + (1 if allowed else 0)
        if allowed:
            assert Job.objects.latest("pk").requested_by == people[role]
            assert Job.objects.latest("pk").kind == JOB_REQUESTS[name][0]
    elif name == "job_approve":
        assert job.status == (JobStatus.QUEUED if allowed else JobStatus.AWAITING_APPROVAL)
        assert job.approved_by == (people[role] if allowed else None)
    elif name == "job_refuse":
        assert job.status == (JobStatus.REFUSED if allowed else JobStatus.AWAITING_APPROVAL)
    elif name == "job_cancel":
        assert job.status == (JobStatus.CANCELLED if allowed else JobStatus.AWAITING_APPROVAL)
    elif name == "language_set":  # saved for a signed-in user; before sign-in only the cookie
        assert UserPreference.objects.filter(language="ka").count() == (0 if role == "anonymous" else 1)
        assert response.cookies[settings.LANGUAGE_COOKIE_NAME].value == "ka"
    else:
        assert Job.objects.count() == jobs_before
        assert job.status == JobStatus.AWAITING_APPROVAL


def test_an_operator_cancels_their_own_job_over_http(
    people, unprotected_env, django_capture_on_commit_callbacks
):
    client = Client()
    client.force_login(people["operator"])
    with django_capture_on_commit_callbacks(execute=False):
        client.post("/jobs/environment-check/", {"environment": unprotected_env.key})
    job = Job.objects.latest("pk")
    response = client.post(f"/jobs/{job.pk}/cancel/")
    assert response.status_code == 302
    assert Job.objects.get(pk=job.pk).status == JobStatus.CANCELLED


def test_a_direct_post_cannot_approve_ones_own_request(unprotected_env, django_capture_on_commit_callbacks):
    admin = make_user("admin1", "Operator", "Approver")
    job = waiting_job(admin, unprotected_env.key)
    client = Client()
    client.force_login(admin)
    response = client.post(f"/jobs/{job.pk}/approve/", {"digest": job.params_digest})
    assert response.status_code == 403
    job.refresh_from_db()
    assert job.status == JobStatus.AWAITING_APPROVAL and job.approved_by is None


def test_a_replayed_approval_changes_nothing(people, unprotected_env, django_capture_on_commit_callbacks):
    job = waiting_job(make_user("requester", "Operator"), unprotected_env.key)
    client = Client()
    client.force_login(people["approver"])
    with django_capture_on_commit_callbacks(execute=False):
        first = client.post(f"/jobs/{job.pk}/approve/", {"digest": job.params_digest})
        second = client.post(f"/jobs/{job.pk}/approve/", {"digest": job.params_digest}, follow=True)
    assert first.status_code == 302
    assert "not awaiting approval" in second.content.decode()
    assert Job.objects.get(pk=job.pk).status == JobStatus.QUEUED


def test_an_unknown_environment_is_a_404_not_a_500(people) -> None:
    client = Client()
    client.force_login(people["viewer"])
    assert client.get("/environments/nope/").status_code == 404
    client.force_login(people["operator"])
    response = client.post("/jobs/environment-check/", {"environment": "nope"})
    assert response.status_code == 302 and Job.objects.count() == 0
