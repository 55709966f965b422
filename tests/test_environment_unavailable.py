"""An environment whose database is down: its pages answer 503 naming it, never a 500."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.conftest import free_port_for_tests
from tests.test_security import with_password

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

PASSWORD = "down-s3cret-pw"
PAGES = [
    "stuck_runs",
    "suspicious_runs",
    "locks_without_run",
    "procedure",
    "run_detail",
    "reconciliation_home",
]


@pytest.mark.parametrize("name", PAGES)
def test_an_unreachable_environments_pages_say_so(name, protected_env, client_for, viewer, settings) -> None:
    down_url = f"postgresql://ops:{PASSWORD}@127.0.0.1:{free_port_for_tests()}/phoenix"
    with with_password(protected_env, down_url, settings) as env:
        kwargs = {"env_key": env.key, **({"run_id": 1620} if name == "run_detail" else {})}
        response = client_for(viewer).get(reverse(name, kwargs=kwargs))
    text = response.content.decode()
    assert response.status_code in (200, 503), text[:300]
    assert PASSWORD not in text
    if response.status_code == 503:
        assert (
            f'data-env-unavailable="{env.key}"' in text and f"{env.label} did not answer" in text
        )  # English: the viewer has no preference
        assert "OperationalError" in text


def test_the_dashboards_own_pages_keep_working_meanwhile(protected_env, client_for, viewer, settings) -> None:
    down_url = f"postgresql://ops:{PASSWORD}@127.0.0.1:{free_port_for_tests()}/phoenix"
    with with_password(protected_env, down_url, settings):
        client = client_for(viewer)
        for url in ("/jobs/", "/audit/", "/alerts/", "/notifications/", "/"):
            assert client.get(url).status_code == 200, url


def test_a_bug_in_an_environment_query_is_not_passed_off_as_an_outage(
    protected_env, client_for, viewer, monkeypatch
) -> None:
    from django.db import ProgrammingError

    from locks import selectors

    def broken(*args, **kwargs):
        raise ProgrammingError('column "nope" does not exist')

    monkeypatch.setattr(selectors, "stuck_runs", broken)
    client = client_for(viewer)
    client.raise_request_exception = False
    response = client.get(reverse("stuck_runs", kwargs={"env_key": protected_env.key}))
    assert response.status_code == 500


def test_with_the_dashboards_own_database_down_an_environment_is_not_blamed(
    protected_env, client_for, viewer, settings, monkeypatch
) -> None:
    from billing_ops import middleware

    monkeypatch.setattr(middleware, "_dashboard_database_up", lambda: False)
    down_url = f"postgresql://ops:{PASSWORD}@127.0.0.1:{free_port_for_tests()}/phoenix"
    with with_password(protected_env, down_url, settings) as env:
        client = client_for(viewer)
        client.raise_request_exception = False
        response = client.get(reverse("stuck_runs", kwargs={"env_key": env.key}))
    assert response.status_code == 500
