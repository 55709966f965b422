"""Benchmark: releasing the 156,651 locks of BILLING202511200006 in the Dev demo.

Prints the batched release's time and rows/s beside one bare
``DELETE FROM lock.locks WHERE billing_id = ...`` on the same rows (rolled back), and for
both the longest a concurrent reader waited: a loop of primary-key SELECTs on lock.locks
in another session, whose slowest answer shows any blocking. The preview (the COPY of the
rows into the dashboard's database) is timed separately. Each round restores the released
locks with the product's own restore job, so the demo keeps its locks; a VACUUM before each
round gives both sides the same settled table. Restored rows land wherever the table has
room, so later rounds find the run's rows spread over more of the table than a fresh seed
does: round 1 after `seed_demo --reset` is the platform's own layout.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from django.contrib.auth.models import Group, User
from django.db import connections

from billing_ops import services
from billing_ops.environments import environment_connect, get_environment
from billing_ops.models import Job, JobLogLine
from billing_ops.selectors import billing_status_labels
from locks import release
from locks.models import LockReleaseBatch, LockReleasePlan

BIG_RUN_NUMBER = "BILLING202511200006"
READER_PAUSE_S = 0.002


class Reader(threading.Thread):
    """Reads one lock by primary key over and over; remembers the slowest answer."""

    def __init__(self, env: Any, lock_id: str) -> None:
        super().__init__(daemon=True)
        self.env, self.lock_id = env, lock_id
        self.stop = threading.Event()
        self.slowest_ms = 0.0
        self.reads = 0

    def run(self) -> None:
        with environment_connect(self.env, autocommit=True) as conn:
            while not self.stop.is_set():
                started = time.perf_counter()
                conn.execute("SELECT id, billing_id FROM lock.locks WHERE id = %s", [self.lock_id]).fetchall()
                self.slowest_ms = max(self.slowest_ms, (time.perf_counter() - started) * 1000)
                self.reads += 1
                time.sleep(READER_PAUSE_S)


def with_reader(env: Any, lock_id: str, func: Any) -> tuple[float, Reader]:
    reader = Reader(env, lock_id)
    reader.start()
    time.sleep(0.2)
    started = time.perf_counter()
    func()
    elapsed = time.perf_counter() - started
    reader.stop.set()
    reader.join()
    return elapsed, reader


def _user(name: str, *roles: str) -> User:
    user, _ = User.objects.get_or_create(username=name)
    for role in roles:
        user.groups.add(Group.objects.get(name=role))
    return user


ROUNDS = 5


def _vacuum(env: Any) -> None:
    """Every round starts from the same table: the rows a restore put back are settled
    (hint bits, visibility map) and the released ones' dead tuples are gone, so neither an
    autovacuum nor the first reader's hint-bit writes land inside a measurement."""
    with environment_connect(env, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) lock.locks")


def _round(
    env: Any, run_id: int, reader_lock: str, operator: User, approver: User, *, row_by_row_only: bool = False
) -> dict[str, Any]:
    def bare_delete() -> None:
        with environment_connect(env) as conn:
            conn.execute("SET statement_timeout = 0")
            conn.execute("DELETE FROM lock.locks WHERE billing_id = %s", [run_id])
            conn.rollback()  # measured up to here; the demo keeps its locks

    _vacuum(env)
    bare_s, bare_reader = with_reader(env, reader_lock, bare_delete)

    started = time.perf_counter()
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[run_id], system_only=False)
    preview_s = time.perf_counter() - started
    if row_by_row_only:  # as a plan made before the fast path existed: every batch row by row
        LockReleasePlan.objects.filter(pk=plan.pk).update(xmin_horizon=None)
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    ours_s, our_reader = with_reader(
        env, reader_lock, lambda: services.job_execute(job_id=job.pk, worker="bench")
    )
    job = Job.objects.get(pk=job.pk)
    assert job.status == "succeeded", job.error
    # Batches that missed the fast path (logged by the job; the bench runs in English).
    row_by_row = JobLogLine.objects.filter(job_id=job.pk, message__contains="row by row").count()

    restore = release.restore_request(actor=approver, release_job_id=job.pk)
    started = time.perf_counter()
    services.job_execute(job_id=restore.pk, worker="bench")
    restore_s = time.perf_counter() - started
    restored = Job.objects.get(pk=restore.pk).result["restored"]
    assert restored == job.result["released"], (restored, job.result)
    return {
        "bare_s": bare_s,
        "bare_read_ms": bare_reader.slowest_ms,
        "preview_s": preview_s,
        "ours_s": ours_s,
        "our_read_ms": our_reader.slowest_ms,
        "released": job.result["released"],
        "row_by_row": row_by_row,
        "restore_s": restore_s,
    }


def _statement_costs(env: Any, run_id: int, operator: User) -> None:
    """Where the release's time goes: the bare DELETE beside the release's own batch
    statements (FAST_DELETE_SQL, one short transaction each, as the job runs them) over a
    fresh plan of the whole run, all rolled back, ROUNDS times in turn; medians."""
    _vacuum(env)
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[run_id], system_only=False)
    batches = list(LockReleaseBatch.objects.filter(plan=plan).order_by("batch_no"))
    with connections[env.alias].cursor() as cursor:
        labels = billing_status_labels(cursor)
    times: dict[str, list[float]] = {"bare DELETE": [], "the release's batch statements": []}
    for _round_no in range(ROUNDS):
        with environment_connect(env) as conn:
            conn.execute("SET statement_timeout = 0")
            started = time.perf_counter()
            conn.execute("DELETE FROM lock.locks WHERE billing_id = %s", [run_id])
            times["bare DELETE"].append((time.perf_counter() - started) * 1000)
            conn.rollback()
        with environment_connect(env, autocommit=True) as conn:
            started = time.perf_counter()
            for batch in batches:
                with conn.transaction(force_rollback=True):
                    deleted = release.fast_delete_batch(conn, env, plan, batch, labels)
                    assert deleted == batch.size, (deleted, batch.size)
            times["the release's batch statements"].append((time.perf_counter() - started) * 1000)
    print(f"  the statements alone, whole run, rolled back (medians of {ROUNDS}):")
    bare = statistics.median(times["bare DELETE"])
    for name, values in times.items():
        ms = statistics.median(values)
        print(f"    {name:40s} {ms:7.1f} ms  ({ms / bare:.2f}x bare)")


def main() -> None:
    env = get_environment("dev")
    operator = _user("bench-operator", "Operator")
    approver = _user("bench-approver", "Approver")
    with environment_connect(env) as conn:
        run_id = conn.execute(
            "SELECT id FROM billing.billings WHERE billing_number = %s", [BIG_RUN_NUMBER]
        ).fetchone()[0]
        reader_lock = conn.execute("SELECT id FROM lock.locks WHERE billing_id IS NULL LIMIT 1").fetchone()[0]
        count = conn.execute("SELECT count(*) FROM lock.locks WHERE billing_id = %s", [run_id]).fetchone()[0]

    print(
        f"\nLock release, Dev demo, {BIG_RUN_NUMBER} ({count:,} locks of 1,000,000), "
        f"{ROUNDS} rounds (bare DELETE rolled back, then preview, release, restore):"
    )
    rounds = []
    for number in range(1, ROUNDS + 1):
        r = _round(env, run_id, reader_lock, operator, approver)
        rounds.append(r)
        print(
            f"  round {number}: bare DELETE {r['bare_s'] * 1000:7.1f} ms, batched release "
            f"{r['ours_s'] * 1000:7.1f} ms ({r['ours_s'] / r['bare_s']:.2f}x), "
            f"slowest concurrent read {max(r['bare_read_ms'], r['our_read_ms']):5.1f} ms"
            + (f", {r['row_by_row']} batches compared row by row" if r["row_by_row"] else "")
        )

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    ratios = sorted(r["ours_s"] / r["bare_s"] for r in rounds)
    bare_s, ours_s = median("bare_s"), median("ours_s")
    print(f"  medians of {ROUNDS}:")
    bare_read_ms = max(r["bare_read_ms"] for r in rounds)
    print(
        f"  bare DELETE ... WHERE billing_id (rolled back) {bare_s * 1000:9.1f} ms  "
        f"{count / bare_s:10,.0f} rows/s  slowest concurrent read {bare_read_ms:6.1f} ms"
    )
    print(f"  preview: COPY the rows into the plan           {median('preview_s') * 1000:9.1f} ms")
    print(
        f"  batched release ({release.BATCH_SIZE_ROWS:,}-row batches)          {ours_s * 1000:9.1f} ms  "
        f"{median('released') / ours_s:10,.0f} rows/s  slowest concurrent read "
        f"{max(r['our_read_ms'] for r in rounds):6.1f} ms"
    )
    print(
        f"  release / bare DELETE, per round: median {statistics.median(ratios):.2f}x, "
        f"range {ratios[0]:.2f}x-{ratios[-1]:.2f}x"
    )
    exact = _round(env, run_id, reader_lock, operator, approver, row_by_row_only=True)
    print(
        f"  one more round, every batch compared row by row (the fallback): bare DELETE "
        f"{exact['bare_s'] * 1000:.1f} ms, release {exact['ours_s'] * 1000:.1f} ms "
        f"({exact['ours_s'] / exact['bare_s']:.2f}x), slowest concurrent read "
        f"{max(exact['bare_read_ms'], exact['our_read_ms']):.1f} ms"
    )
    _statement_costs(env, run_id, operator)
    restore_ms = median("restore_s") * 1000
    print(f"  restore of the {rounds[0]['released']:,} released rows           {restore_ms:9.1f} ms")
    operator.delete() if not Job.objects.filter(requested_by=operator).exists() else None


if __name__ == "__main__":
    main()
