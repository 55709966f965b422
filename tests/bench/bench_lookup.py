"""Benchmark of the lock lookup ("who holds this lock?") on the Dev demo (1,000,000 locks).

Prints, as medians of several runs, the lookup page's server time (every environment,
concurrently) for each kind of query — an entity id (with the learned lock-key format
cached, and learning it afresh), a lock key, the billing number of the run holding
156,651 locks, and its run id — beside the bare queries the page stands on: the
``lock_key = ANY(...)`` it uses for entity ids, and the ``entity_id = %s`` scan it falls
back to where no lock-key format can be learned. First without, then with indexes on
lock.locks(entity_id) and (billing_id), which the platform owns and the dashboard does not
create; both are dropped again at the end. Run with `make bench BENCH_ARGS=lookup`.
"""

from __future__ import annotations

from collections.abc import Callable

from django.contrib.auth.models import Group, User
from django.core.cache import cache
from django.db import connections
from django.test import Client

from billing_ops.environments import environment_connect, get_environment
from tests.bench.bench_locks import BIG_RUN_NUMBER, RUNS, line, median_ms

INDEXES = {
    "bench_lookup_entity_id_idx": "lock.locks (entity_id)",
    "bench_lookup_billing_id_idx": "lock.locks (billing_id)",
}


def main() -> None:
    env = get_environment("dev")
    user, _ = User.objects.get_or_create(username="bench-viewer")
    user.groups.add(Group.objects.get(name="Viewer"))
    client = Client(SERVER_NAME="127.0.0.1")
    client.force_login(user)
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM lock.locks")
        total_locks = cursor.fetchone()[0]
        cursor.execute("SELECT id FROM billing.billings WHERE billing_number = %s", [BIG_RUN_NUMBER])
        big_run = cursor.fetchone()[0]
        # A lock of the big run, from the middle of the table.
        cursor.execute(
            "SELECT entity_id, lock_key FROM lock.locks WHERE billing_id = %s ORDER BY id LIMIT 1", [big_run]
        )
        entity_id, lock_key = cursor.fetchone()
        cursor.execute("SELECT DISTINCT entity_type FROM lock.locks")
        types = [row[0] for row in cursor.fetchall()]
    keys = [entity_id] + [f"{t}:{entity_id}" for t in types]

    def page(query: str, *, cold: bool = False) -> Callable[[], None]:
        def get() -> None:
            if cold:
                cache.clear()  # forget the learned lock-key formats
            response = client.get("/lookup/", {"q": query})
            assert response.status_code == 200, response.status_code
            assert b"data-lock=" in response.content or b"data-run=" in response.content, query

        return get

    def bare(sql: str, params: list[object]) -> Callable[[], None]:
        def run() -> None:
            with environment_connect(env) as conn:
                assert conn.execute(sql, params).fetchall()

        return run

    print(
        f"\nLock lookup, Dev demo: {total_locks:,} locks; entity {entity_id} ({lock_key}), {BIG_RUN_NUMBER}"
    )
    try:
        for label in (
            "without indexes on lock.locks(entity_id, billing_id)",
            "with indexes on lock.locks(entity_id) and (billing_id)",
        ):
            if label.startswith("with "):
                with environment_connect(env, autocommit=True) as conn:
                    for name, columns in INDEXES.items():
                        conn.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {columns}")
                    conn.execute("ANALYZE lock.locks")
            figures = {
                "page: entity id (format cached)": median_ms(page(entity_id)),
                "page: entity id (format learned afresh)": median_ms(page(entity_id, cold=True)),
                "page: lock key": median_ms(page(lock_key)),
                f"page: billing number ({BIG_RUN_NUMBER})": median_ms(page(BIG_RUN_NUMBER)),
                f"page: run id ({big_run})": median_ms(page(str(big_run))),
                "bare lock_key = ANY(...) (Dev)": median_ms(
                    bare("SELECT * FROM lock.locks WHERE lock_key = ANY(%s)", [keys])
                ),
                "bare entity_id = %s, the fallback (Dev)": median_ms(
                    bare("SELECT * FROM lock.locks WHERE entity_id = %s", [entity_id])
                ),
            }
            print(f"\n  {label} (median of {RUNS}; pages query all 5 environments):")
            for name, ms in figures.items():
                line(name, ms)
    finally:
        with environment_connect(env, autocommit=True) as conn:
            for name in INDEXES:
                conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS lock.{name}")
        user.delete()


if __name__ == "__main__":
    main()
