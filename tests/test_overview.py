"""The overview and /healthz with environments that are down or hung."""

from __future__ import annotations

import json
import time

import pytest
from django.test import Client

from tests.conftest import free_port_for_tests

pytestmark = pytest.mark.django_db(databases="__all__")


def test_the_overview_shows_every_environment(client_for, viewer, unprotected_env) -> None:
    response = client_for(viewer).get("/")
    assert response.status_code == 200
    page = response.content.decode()
    for row in response.context["rows"]:
        assert f'data-env="{row.status.env.key}"' in page
        assert row.status.reachable, row.status.error
    assert "Queue check" not in page  # viewers get no action


def test_an_unreachable_environment_is_marked_and_the_others_render(
    client_for, viewer, extra_environment, unprotected_env
) -> None:
    down = extra_environment(
        "down", f"postgresql://nobody:secret-pw@127.0.0.1:{free_port_for_tests()}/phoenix", label="Down"
    )
    response = client_for(viewer).get("/")
    assert response.status_code == 200
    statuses = {row.status.env.key: row.status for row in response.context["rows"]}
    assert not statuses["down"].reachable and "Connection refused" in statuses["down"].error
    assert statuses["down"].verdict.colour == "red"
    assert statuses[unprotected_env.key].reachable
    page = response.content.decode()
    assert "Unreachable" in page and "secret-pw" not in page
    assert client_for(viewer).get(f"/environments/{down.key}/").status_code == 200


def test_a_hung_environment_costs_no_more_than_its_timeout(
    client_for, viewer, extra_environment, blackhole_port, settings, unprotected_env
) -> None:
    settings.CONNECT_TIMEOUT_S = 2
    extra_environment("hung", f"postgresql://x@127.0.0.1:{blackhole_port}/phoenix")
    started = time.monotonic()
    response = client_for(viewer).get("/")
    elapsed = time.monotonic() - started
    statuses = {row.status.env.key: row.status for row in response.context["rows"]}
    assert not statuses["hung"].reachable and statuses[unprotected_env.key].reachable
    # bounded by the environment's own connect timeout (2 s) plus a margin, not by the others
    assert elapsed < 2 + 3, elapsed


def test_healthz_reports_each_dependency_without_login(extra_environment, celery_worker) -> None:
    extra_environment("down", f"postgresql://x:pw@127.0.0.1:{free_port_for_tests()}/phoenix")
    response = Client().get("/healthz")
    report = json.loads(response.content)
    assert report["default_database"]["ok"] is True
    assert report["redis"]["ok"] is True
    assert any(w["name"] == celery_worker.name for w in report["workers"])
    assert report["environments"]["down"]["reachable"] is False
    assert report["environments"]["down"]["error"]
    assert all(e["reachable"] for k, e in report["environments"].items() if k != "down")
    assert response.status_code == 200 and report["ok"] is True
    assert "pw@" not in response.content.decode()


def test_healthz_says_503_when_redis_is_down(settings) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port_for_tests()}/0"
    response = Client().get("/healthz")
    assert response.status_code == 503
    assert json.loads(response.content)["redis"]["ok"] is False


def test_healthz_says_503_when_no_worker_has_reported_in(settings) -> None:
    settings.WORKER_HEARTBEAT_KEY_PREFIX = "billing_ops:worker:no-such-queue:"
    response = Client().get("/healthz")
    report = json.loads(response.content)
    assert report["redis"]["ok"] is True and report["workers"] == []
    assert response.status_code == 503 and report["ok"] is False


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_the_overview_shows_recent_figures_again_within_its_max_age(
    client_for, viewer, unprotected_env, clean_environments, settings
) -> None:
    """Many people on the overview cost an environment one aggregate per max age, not one
    per page view; the page says when the figures were measured."""
    from locks import selectors
    from tests.factories import make_locks, make_run

    def total_locks() -> tuple[int, str]:
        response = client_for(viewer).get("/")
        status = next(row.status for row in response.context["rows"] if row.status.env == unprotected_env)
        assert f'data-measured-at="{status.measured_at.isoformat()}"' in response.content.decode()
        return status.figures.total_locks, status.measured_at.isoformat()

    selectors._recent_figures.clear()
    settings.OVERVIEW_MAX_AGE_S = 60
    try:
        before, measured = total_locks()
        make_run(unprotected_env, 5)
        make_locks(unprotected_env, 5, 7)
        assert total_locks() == (before, measured)  # within the max age: the same figures
        settings.OVERVIEW_MAX_AGE_S = 0
        now, measured_now = total_locks()
        assert now == before + 7 and measured_now > measured
    finally:
        selectors._recent_figures.clear()
