"""Benchmark: releasing the 156,651 locks of BILLING202511200006 in the Dev demo.

Prints the batched release's time and rows/s beside one bare
``DELETE FROM lock.locks WHERE billing_id = ...`` on the same rows (rolled back), and for
both the longest a concurrent reader waited: a loop of primary-key SELECTs on lock.locks
in another session, whose slowest answer shows any blocking. The preview (the COPY of the
rows into the dashboard's database) is timed separately. The bench restores the released
locks at the end with the product's own restore job, so the demo is as it was.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from django.contrib.auth.models import Group, User

from billing_ops import services
from billing_ops.environments import environment_connect, get_environment
from billing_ops.models import Job
from locks import release

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

    def bare_delete() -> None:
        with environment_connect(env) as conn:
            conn.execute("SET statement_timeout = 0")
            conn.execute("DELETE FROM lock.locks WHERE billing_id = %s", [run_id])
            conn.rollback()  # measured up to here; the demo keeps its locks

    bare_s, bare_reader = with_reader(env, reader_lock, bare_delete)

    started = time.perf_counter()
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[run_id], system_only=False)
    preview_s = time.perf_counter() - started
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    ours_s, our_reader = with_reader(
        env, reader_lock, lambda: services.job_execute(job_id=job.pk, worker="bench")
    )
    job = Job.objects.get(pk=job.pk)
    assert job.status == "succeeded", job.error
    released = job.result["released"]

    restore = release.restore_request(actor=approver, release_job_id=job.pk)
    started = time.perf_counter()
    services.job_execute(job_id=restore.pk, worker="bench")
    restore_s = time.perf_counter() - started
    restored = Job.objects.get(pk=restore.pk).result["restored"]

    print(f"\nLock release, Dev demo, {BIG_RUN_NUMBER} ({count:,} locks of 1,000,000):")
    print(
        f"  bare DELETE ... WHERE billing_id (rolled back) {bare_s * 1000:9.1f} ms  "
        f"{count / bare_s:10,.0f} rows/s  slowest concurrent read {bare_reader.slowest_ms:6.1f} ms"
    )
    print(f"  preview: COPY the rows into the plan           {preview_s * 1000:9.1f} ms")
    print(
        f"  batched release ({release.BATCH_SIZE_ROWS:,}-row batches)          {ours_s * 1000:9.1f} ms  "
        f"{released / ours_s:10,.0f} rows/s  slowest concurrent read {our_reader.slowest_ms:6.1f} ms  "
        f"({ours_s / bare_s:.2f}x bare)"
    )
    print(f"  restore of the {restored:,} released rows           {restore_s * 1000:9.1f} ms")
    operator.delete() if not Job.objects.filter(requested_by=operator).exists() else None


if __name__ == "__main__":
    main()
