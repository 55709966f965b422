"""Benchmark of the stuck-lock monitor on the Dev demo (about 1,000,000 lock rows).

Prints, as medians of several runs: the bare seed-report SQL on the same database, the
overview's server time (all environments, concurrently), Dev's stuck-runs page and the
drill-down of BILLING202511200006 (156,651 locks) — each beside the bare query — first
without and then with an index on lock.locks(billing_id), which the platform owns and the
dashboard only recommends. Run with `make bench`; the index is dropped again at the end.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from django.contrib.auth.models import Group, User
from django.db import connections
from django.test import Client

from billing_ops.environments import environment_connect, get_environment
from locks.selectors import STUCK_RUNS_SQL

RUNS = 7
BIG_RUN_NUMBER = "BILLING202511200006"
INDEX_NAME = "bench_locks_billing_id_idx"


def median_ms(func: Callable[[], object], runs: int = RUNS) -> float:
    func()  # warm up: caches, plans, connections
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        func()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def line(label: str, ms: float, note: str = "") -> None:
    print(f"  {label:<48} {ms:8.1f} ms" + (f"  ({note})" if note else ""))


def main() -> None:
    env = get_environment("dev")
    user, _ = User.objects.get_or_create(username="bench-viewer")
    user.groups.add(Group.objects.get(name="Viewer"))
    client = Client(SERVER_NAME="127.0.0.1")  # an allowed host, as a browser would send
    client.force_login(user)
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT id FROM billing.billings WHERE billing_number = %s", [BIG_RUN_NUMBER])
        big_run = cursor.fetchone()[0]

    def bare() -> None:
        with environment_connect(env) as conn:
            conn.execute(STUCK_RUNS_SQL).fetchall()

    def bare_drill() -> None:
        with environment_connect(env) as conn:
            conn.execute(
                "SELECT entity_type, system_lock, count(*) FROM lock.locks"
                " WHERE billing_id = %s GROUP BY 1, 2",
                [big_run],
            ).fetchall()

    def page(path: str) -> Callable[[], None]:
        def get() -> None:
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code)

        return get

    try:
        for label in (
            "without an index on lock.locks(billing_id)",
            "with an index on lock.locks(billing_id)",
        ):
            if "with an" in label:
                with environment_connect(env, autocommit=True) as conn:
                    conn.execute(
                        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX_NAME} ON lock.locks (billing_id)"
                    )
                    conn.execute("ANALYZE lock.locks")
            bare_ms = median_ms(bare)
            overview_ms = median_ms(page("/"))
            stuck_ms = median_ms(page("/environments/dev/stuck-runs/"))
            drill_bare_ms = median_ms(bare_drill)
            drill_ms = median_ms(page(f"/environments/dev/runs/{big_run}/"))
            print(f"\nStuck-lock monitor, Dev demo, {label} (median of {RUNS}):")
            line("bare seed-report SQL", bare_ms)
            line("overview page (all 5 environments)", overview_ms, f"{overview_ms / bare_ms:.2f}x bare")
            line("stuck-runs page (Dev)", stuck_ms, f"{stuck_ms / bare_ms:.2f}x bare")
            line("bare GROUP BY of one run's locks", drill_bare_ms)
            line(
                f"drill-down {BIG_RUN_NUMBER} (156,651 locks)",
                drill_ms,
                f"{drill_ms / bare_ms:.2f}x bare seed SQL, {drill_ms / drill_bare_ms:.2f}x its own GROUP BY",
            )
    finally:
        with environment_connect(env, autocommit=True) as conn:
            conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS lock.{INDEX_NAME}")
        user.delete()


if __name__ == "__main__":
    main()
