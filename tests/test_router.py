"""The router: mirror models need an explicit environment; dashboard models live in default."""

from __future__ import annotations

import pytest
from django.db import connections

from audit.models import AuditLog
from billing_ops.models import BillingRun, Job
from billing_ops.routers import EnvironmentRouter, MissingEnvironment
from locks.models import Lock
from reconciliation.models import InvoiceLine

MIRRORS = [BillingRun, Lock, InvoiceLine, AuditLog]


@pytest.mark.parametrize("model", MIRRORS)
def test_a_mirror_query_without_environment_raises(model) -> None:
    with pytest.raises(MissingEnvironment, match=r"\.using\(env\.alias\)"):
        list(model.objects.all()[:1])


@pytest.mark.parametrize("model", MIRRORS)
def test_a_mirror_write_without_environment_raises(model) -> None:
    with pytest.raises(MissingEnvironment):
        model.objects.filter(pk=1).delete()


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("model", MIRRORS)
def test_a_mirror_query_with_environment_reads_that_environment(
    model, unprotected_env, clean_environments
) -> None:
    assert list(model.objects.using(unprotected_env.alias).all()[:1]) == []


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_mirrors_read_what_the_platform_wrote_and_tolerate_extra_columns(
    unprotected_env, clean_environments
) -> None:
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute("ALTER TABLE billing.billings ADD COLUMN IF NOT EXISTS tenant text DEFAULT 'x'")
        cursor.execute("ALTER TYPE billing.billing_status ADD VALUE IF NOT EXISTS 'ARCHIVED_SOMEHOW'")
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute(
            "INSERT INTO billing.billings (id, billing_number, status, process_stage) "
            "VALUES (7, 'BILLING7', 'ARCHIVED_SOMEHOW', 'DRAFT')"
        )
        cursor.execute(
            "INSERT INTO lock.locks (id, lock_key, entity_type, entity_id, billing_id, system_lock) "
            "VALUES ('L1', 'customers:1', 'customers', '1', 7, true)"
        )
    run = BillingRun.objects.using(unprotected_env.alias).get(pk=7)
    assert run.status == "ARCHIVED_SOMEHOW"
    lock = Lock.objects.using(unprotected_env.alias).get()
    assert lock.billing_id == run.pk and lock._state.db == unprotected_env.alias
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute("ALTER TABLE billing.billings DROP COLUMN tenant")


def test_dashboard_models_migrate_only_in_default() -> None:
    router = EnvironmentRouter()
    assert router.allow_migrate("default", "billing_ops", model_name="job", model=Job)
    assert not router.allow_migrate("env_dev", "billing_ops", model_name="job", model=Job)
    assert not router.allow_migrate("default", "locks", model_name="lock", model=Lock)
    assert router.db_for_write(Job) == "default"


@pytest.mark.django_db(databases="__all__")
def test_no_dashboard_table_exists_in_an_environment_database(unprotected_env) -> None:
    with connections[unprotected_env.alias].cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'billing_ops_%%' OR tablename LIKE 'auth_%%'"
        )
        assert cursor.fetchone()[0] == 0
