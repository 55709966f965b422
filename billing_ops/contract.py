"""The contract schema (billing_ops/sql/contract_schema.sql) for demo and test databases.

The guard here is the one thing that keeps the demo schema away from a real
environment: it is applied only to an environment marked ``demo = true`` in the
environments file, or to a test database created by the test runner.
"""

from __future__ import annotations

from pathlib import Path

from django.db import connections

from billing_ops.environments import Environment

SCHEMA_FILE = Path(__file__).parent / "sql" / "contract_schema.sql"
CONTRACT_SCHEMAS = ("billing", "lock", "billing_run")
CONTRACT_PUBLIC_TABLES = ("invoice_lines", "audit_logs")


class NotADemoDatabase(PermissionError):
    pass


def _check_demo_or_test(env: Environment) -> None:
    dbname = connections[env.alias].settings_dict["NAME"]
    if not (env.demo or dbname.startswith("test_")):
        raise NotADemoDatabase(
            f"environment {env.key!r} is not marked demo = true and {dbname!r} is not a test "
            "database: refusing to touch its schema"
        )


def contract_schema_apply(env: Environment) -> None:
    """Create the contract's schemas, types, tables, indexes and procedure (idempotent)."""
    _check_demo_or_test(env)
    with connections[env.alias].cursor() as cursor:
        cursor.execute(SCHEMA_FILE.read_text())


def contract_schema_drop(env: Environment) -> None:
    """Remove everything contract_schema_apply created (demo reset and tests only)."""
    _check_demo_or_test(env)
    with connections[env.alias].cursor() as cursor:
        for schema in CONTRACT_SCHEMAS:
            cursor.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        for table in CONTRACT_PUBLIC_TABLES:
            cursor.execute(f'DROP TABLE IF EXISTS public."{table}" CASCADE')
