"""The Prometheus exposition of the stuck-lock figures, parsed back and checked on real data."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connections
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from billing_ops.contract import contract_schema_apply
from billing_ops.environments import Environment, all_environments
from locks.metrics import render_metrics
from locks.selectors import environments_status
from tests.conftest import free_port_for_tests
from tests.factories import make_locks, make_run

# environments_status reads on connections of its own, which see only committed rows.
pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
OLDEST_STUCK_LOCK = datetime(2025, 12, 22, 11, 2, 30)  # naive, in the environment's zone (UTC)
PER_ENVIRONMENT_GAUGES = (
    "billing_ops_billing_runs",
    "billing_ops_completed_runs",
    "billing_ops_completed_runs_with_locks",
    "billing_ops_locks",
    "billing_ops_locks_without_billing",
    "billing_ops_stuck_locks",
    "billing_ops_stale_runs",
    "billing_ops_error_path_runs_with_locks",
    "billing_ops_oldest_stuck_lock_age_seconds",
    "billing_ops_make_billing_run_real_deletes_locks",
    "billing_ops_environment_query_duration_seconds",
)


def samples(body: bytes) -> dict[tuple[str, str], tuple[float, dict[str, str]]]:
    """(metric name, environment key) -> (value, labels), from the exposition text."""
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.type == "gauge", family.name
        for sample in family.samples:
            key = (sample.name, sample.labels["environment"])
            assert key not in found, f"duplicate series {key}"
            found[key] = (sample.value, sample.labels)
    return found


@pytest.fixture
def shaped(unprotected_env: Environment, clean_environments: None) -> Environment:
    env = unprotected_env
    make_run(env, 1620, stage="DRAFT", number="BILLING202512220055")
    make_locks(env, 1620, 2000, system=True, created=OLDEST_STUCK_LOCK)
    make_locks(env, 1620, 91, system=False, entity_type="customers", created=OLDEST_STUCK_LOCK + timedelta(1))
    make_run(env, 1700)
    make_locks(env, 1700, 3, created=OLDEST_STUCK_LOCK + timedelta(hours=5))
    make_run(env, 1701)  # COMPLETED without locks
    make_run(env, 1800, status="GENERATED")
    make_locks(env, 1800, 5)
    old = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=2)
    make_run(env, 1900, status="IN_PROGRESS_ACCOUNTING", created=old, modified=old)
    make_locks(env, 1900, 7)
    make_locks(env, None, 20, system=False, entity_type="customers")
    return env


@pytest.fixture
def leaking_env(unprotected_env: Environment) -> Iterator[Environment]:
    """Another environment whose make_billing_run_real does not delete the locks."""
    env = next(e for e in all_environments() if e.key != unprotected_env.key)
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "CREATE OR REPLACE PROCEDURE billing_run.make_billing_run_real(p_billing_id bigint) "
            "LANGUAGE plpgsql AS $$ BEGIN "
            "UPDATE billing.billings SET process_stage = 'ACCOUNTING' WHERE id = p_billing_id; END $$"
        )
    yield env
    contract_schema_apply(env)  # puts the contract's procedure back


def test_the_metrics_parse_and_equal_the_figures(shaped: Environment, leaking_env: Environment) -> None:
    statuses = environments_status([shaped, leaking_env])
    body, content_type = render_metrics(statuses, now=NOW)
    assert content_type.startswith("text/plain; version=0.0.4")
    found = samples(body)
    figures = statuses[0].figures
    assert figures is not None
    expected = {
        "billing_ops_environment_up": 1,
        "billing_ops_billing_runs": 5,
        "billing_ops_completed_runs": 3,
        "billing_ops_completed_runs_with_locks": 2,
        "billing_ops_locks": 2000 + 91 + 3 + 5 + 7 + 20,
        "billing_ops_locks_without_billing": 20,
        "billing_ops_stuck_locks": 2000 + 91 + 3,
        "billing_ops_stale_runs": 1,
        "billing_ops_error_path_runs_with_locks": 1,
        "billing_ops_oldest_stuck_lock_age_seconds": (
            NOW - OLDEST_STUCK_LOCK.replace(tzinfo=UTC)
        ).total_seconds(),
        "billing_ops_make_billing_run_real_deletes_locks": 1,
        "billing_ops_environment_query_duration_seconds": figures.duration_ms / 1000,
    }
    for name, value in expected.items():
        assert found[(name, shaped.key)] == (
            pytest.approx(value),
            {"environment": shaped.key, "label": shaped.label},
        )


def test_an_environment_without_stuck_locks_has_no_age_and_a_leaking_procedure_shows(
    shaped: Environment, leaking_env: Environment
) -> None:
    found = samples(render_metrics(environments_status([shaped, leaking_env]), now=NOW)[0])
    assert ("billing_ops_oldest_stuck_lock_age_seconds", leaking_env.key) not in found
    assert found[("billing_ops_stuck_locks", leaking_env.key)][0] == 0
    assert found[("billing_ops_make_billing_run_real_deletes_locks", leaking_env.key)][0] == 0
    assert found[("billing_ops_environment_up", leaking_env.key)][0] == 1


def test_an_unreachable_environment_exports_only_up_zero(shaped: Environment, extra_environment) -> None:
    extra_environment(
        "down", f"postgresql://x:pw@127.0.0.1:{free_port_for_tests()}/phoenix", label='Down "east" \\ 1'
    )
    down = next(env for env in all_environments() if env.key == "down")
    found = samples(render_metrics(environments_status([down, shaped]), now=NOW)[0])
    assert found[("billing_ops_environment_up", "down")] == (
        0,
        {"environment": "down", "label": 'Down "east" \\ 1'},
    )
    assert [name for name, key in found if key == "down"] == ["billing_ops_environment_up"]
    assert all((name, shaped.key) in found for name in PER_ENVIRONMENT_GAUGES)


def test_each_call_has_its_own_registry(shaped: Environment) -> None:
    statuses = environments_status([shaped])
    first, _ = render_metrics(statuses, now=NOW)
    second, _ = render_metrics(statuses, now=NOW)  # registering twice in one registry would raise
    assert first == second
    assert (
        REGISTRY.get_sample_value(
            "billing_ops_environment_up", {"environment": shaped.key, "label": shaped.label}
        )
        is None
    )
