"""Faults injected into the real services while jobs and pages use them (issue #7).

Each test breaks something for real: a worker SIGKILLed inside an upsert's or a rollback's
transaction, an environment's connection terminated in the middle of a COPY, Redis shut
down while operators submit and a worker runs, a lock held on ``lock.locks``, a folder that
is full or cannot be written, a second ``make run``. What must hold: nothing partial is
committed, no job stays ``running`` or is lost or run twice, and the pages say what
happened instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connections
from django.urls import reverse
from django.utils import timezone

from billing_ops import services
from billing_ops.environments import Environment
from billing_ops.models import Job, JobStatus
from reconciliation.models import RollbackStatus, RunRollback, UpsertRun, UpsertRunStatus
from reconciliation.rollback import rollback_preview, rollback_request
from reconciliation.services import upload_path
from tests.conftest import _test_url, make_user, wait_for
from tests.test_job_worker import finished
from tests.test_upsert import existing_line, query, request_upsert, run, snapshot, write_csv

pytestmark = [pytest.mark.django_db(databases="__all__", transaction=True)]


@pytest.fixture
def env(unprotected_env: Environment, clean_environments: None) -> Environment:
    return unprotected_env


@pytest.fixture
def people(db: None) -> dict[str, Any]:
    return {
        "viewer": make_user("fault-viewer", "Viewer"),
        "operator": make_user("fault-op", "Operator"),
        "approver": make_user("fault-ap", "Approver"),
    }


def backend(env: Environment, application_name: str, *, waiting_on_lock: bool = False) -> int | None:
    """The server process of the job's environment connection (None: it has none)."""
    rows = query(
        env,
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
        + (" AND wait_event_type = 'Lock'" if waiting_on_lock else ""),
        [application_name],
    )
    return rows[0][0] if rows else None


@contextlib.contextmanager
def table_held(env: Environment, table: str, mode: str) -> Iterator[None]:
    """Another session (a migration, a VACUUM FULL, a stuck transaction) holds a lock on
    ``table`` until the block ends."""
    blocker = psycopg.connect(_test_url(env.alias))
    blocker.execute(f"LOCK TABLE {table} IN {mode} MODE")
    try:
        yield
    finally:
        blocker.rollback()
        blocker.close()


def audit_trail_held(env: Environment) -> contextlib.AbstractContextManager[None]:
    """The lock every chained append takes first: a job that has changed its lines, inside
    its transaction, waits there to write its audit rows."""
    return table_held(env, "public.audit_logs", "SHARE ROW EXCLUSIVE")


def locks_table_held(env: Environment) -> contextlib.AbstractContextManager[None]:
    return table_held(env, "lock.locks", "ACCESS EXCLUSIVE")


def worker_killed_and_swept(worker: Any, settings: Any, job: Job) -> services.SweepReport:
    """SIGKILL the worker; once the job's heartbeat is stale, the sweeper settles the job."""
    worker.kill()
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING  # nobody has noticed yet
    settings.JOB_STALE_AFTER_S = 2
    wait_for(
        lambda: (
            Job.objects.get(pk=job.pk).heartbeat_at
            < timezone.now() - timedelta(seconds=settings.JOB_STALE_AFTER_S)
        ),
        what="the dead worker's heartbeat to go stale",
    )
    return services.jobs_sweep()


def lines_csv(tmp_path: Path, count: int, *, first: str = "") -> Path:
    body = first + "".join(
        f"INV-{i},U-{i % 7},ENERGY,Energy line {i},{i % 13},{i}.25\n" for i in range(count)
    )
    return write_csv(tmp_path, body)


def test_a_worker_killed_inside_an_upsert_commits_nothing_and_the_job_says_so(
    celery_worker, env, people, tmp_path, settings, client_for
) -> None:
    existing_line(env, "INV-1", "U-1", "ENERGY", "Energy line 1", "1", "1.00")
    path = lines_csv(tmp_path, 300)  # 299 inserts and 1 update, in 30 batches of 10
    before = snapshot(env)
    try:
        with audit_trail_held(env):
            job = request_upsert(people["operator"], env, path, "killed-1")
            name = f"billing-ops upsert job {job.pk}"
            # Every batch is written (inside the job's transaction): it waits to append its audit rows.
            wait_for(
                lambda: backend(env, name, waiting_on_lock=True), what="the upsert to reach its audit rows"
            )
            assert Job.objects.get(pk=job.pk).progress_message == "Writing the audit trail"
            report = worker_killed_and_swept(celery_worker, settings, job)
        # The orphaned server process gets the lock, finds its client gone and rolls back.
        wait_for(lambda: backend(env, name) is None, what="the dead worker's transaction to end")
    finally:
        celery_worker.start()

    assert snapshot(env) == before  # no line, no audit row
    assert job.pk in report.failed
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and "stopped responding" in job.error
    assert "nothing was committed" in job.error
    upsert_run = UpsertRun.objects.get(job=job)
    assert upsert_run.status == UpsertRunStatus.FAILED and "Nothing was committed." in upsert_run.error
    assert not upload_path(job.params["upload"]).exists()
    page = client_for(people["viewer"]).get(reverse("job_detail", args=[job.pk])).content.decode()
    assert "stopped responding" in page and "nothing was committed" in page
    # The retry the note asks for (a new run id) finds the data as it was before the kill.
    outcome = run(env, path, run_id="killed-2")
    assert (outcome.inserted, outcome.updated) == (299, 1)


def test_a_worker_killed_inside_a_rollback_commits_nothing_and_a_new_request_works(
    celery_worker, env, people, tmp_path, settings
) -> None:
    existing_line(env, "INV-1", "U-1", "ENERGY", "Energy line 1", "1", "1.00")
    outcome = run(env, lines_csv(tmp_path, 40), run_id="to-undo")
    assert (outcome.inserted, outcome.updated) == (39, 1)
    before = snapshot(env)
    preview = rollback_preview(env, "to-undo")
    job = rollback_request(
        actor=people["operator"], env=env, run_id="to-undo", digest=preview.digest, reason="wrong file"
    )
    name = f"billing-ops rollback job {job.pk}"
    try:
        with audit_trail_held(env):
            services.job_approve(actor=people["approver"], job_id=job.pk, digest=job.params_digest)
            # Lines deleted and restored inside its transaction; it waits to write the audit rows
            # (for at most the rollback's lock timeout, 5 s: the kill comes well before).
            wait_for(
                lambda: backend(env, name, waiting_on_lock=True), what="the rollback to reach its audit rows"
            )
            report = worker_killed_and_swept(celery_worker, settings, job)
        wait_for(lambda: backend(env, name) is None, what="the dead worker's transaction to end")
    finally:
        celery_worker.start()

    assert snapshot(env) == before
    assert job.pk in report.failed
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and "nothing was committed" in job.error
    assert RunRollback.objects.get(job=job).status == RollbackStatus.FAILED

    # The run can be rolled back from a new preview, on the restarted worker.
    preview = rollback_preview(env, "to-undo")
    again = rollback_request(
        actor=people["operator"], env=env, run_id="to-undo", digest=preview.digest, reason="second try"
    )
    services.job_approve(actor=people["approver"], job_id=again.pk, digest=again.params_digest)
    again = wait_for(lambda: finished(again.pk), what="the new rollback to finish")
    assert again.status == JobStatus.SUCCEEDED, again.error
    assert query(env, "SELECT count(*) FROM invoice_lines")[0][0] == 1


def test_a_connection_cut_in_the_middle_of_the_copy_fails_the_job_and_writes_nothing(
    celery_worker, env, people, tmp_path
) -> None:
    path = lines_csv(tmp_path, 400_000)  # long enough to catch the COPY at work
    before = snapshot(env)
    job = request_upsert(people["operator"], env, path, "cut-1")
    name = f"billing-ops upsert job {job.pk}"
    copying = """
        SELECT a.pid FROM pg_stat_progress_copy c JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = %s AND c.tuples_processed > 0
    """
    pid = wait_for(lambda: query(env, copying, [name]), interval_s=0.02, timeout_s=120, what="the COPY")[0][0]
    assert query(env, "SELECT pg_terminate_backend(%s)", [pid]) == [(True,)]

    job = wait_for(lambda: finished(job.pk), what="the cut job to settle")
    assert job.status == JobStatus.FAILED
    assert "terminat" in job.error.lower() or "closed" in job.error.lower(), job.error
    assert snapshot(env) == before
    upsert_run = UpsertRun.objects.get(job=job)
    assert upsert_run.status == UpsertRunStatus.FAILED and "Nothing was committed." in upsert_run.error
    assert not upload_path(job.params["upload"]).exists()
    assert job.log_lines.filter(
        message__contains="ROLLBACK: OperationalError", message__endswith="Nothing was committed."
    ).exists()


# --- Redis shut down while operators submit and a worker runs ------------------------------------


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory, worker_environ: dict[str, str], settings: Any) -> Any:
    """A Redis of this test's own (the devstack's private one, append-only file and all),
    with a worker on it and this process's broker pointed at it: stopping it stops nobody
    else's tests."""
    from billing_ops.devstack import PrivateRedis
    from tests.conftest import Worker, broker_at

    redis_server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    redis_server.start()
    settings.REDIS_URL = redis_server.url(1)
    worker = Worker({**worker_environ, "REDIS_URL": settings.REDIS_URL}, "redis-fault-worker")
    with broker_at(settings.REDIS_URL):
        worker.start()
        try:
            yield redis_server
        finally:
            worker.stop()
            redis_server.stop()


def started_count(job: Job) -> int:
    return job.log_lines.filter(message__startswith="Started on").count()


def test_with_redis_down_submissions_are_kept_pages_work_and_nothing_runs_twice(
    own_redis, env, people, client_for
) -> None:
    from tests.test_job_worker import seed_rows

    seed_rows(env)
    operator = client_for(people["operator"])
    with locks_table_held(env):  # the running job waits here
        running = services.job_request(
            actor=people["operator"], kind="environment_check", environment=env.key
        )
        wait_for(lambda: Job.objects.get(pk=running.pk).status == JobStatus.RUNNING, what="the job to start")

        own_redis.stop()  # Redis goes away under the worker and the web

        started = time.monotonic()
        response = operator.post(reverse("environment_check_request"), {"environment": env.key})
        assert response.status_code == 302 and time.monotonic() - started < 10
        submitted = Job.objects.exclude(pk=running.pk).get()
        assert submitted.status == JobStatus.QUEUED and submitted.dispatched_at is None
        assert submitted.dispatch_error
        for name, args in [
            ("overview", []),
            ("environment_detail", [env.key]),
            ("job_detail", [running.pk]),
            ("job_detail", [submitted.pk]),
            ("job_list", []),
        ]:
            assert client_for(people["viewer"]).get(reverse(name, args=args)).status_code == 200, name
        assert client_for(people["viewer"]).get(reverse("healthz")).status_code == 503
        assert services.jobs_sweep().undispatchable == [submitted.pk]

    # The running job finishes its work without Redis: its outcome lives in PostgreSQL.
    wait_for(lambda: Job.objects.get(pk=running.pk).is_finished, what="the running job to finish")
    own_redis.start()  # same port, same append-only file
    assert services.jobs_sweep().redispatched == [submitted.pk]
    wait_for(lambda: Job.objects.get(pk=submitted.pk).is_finished, what="the kept submission to run")
    time.sleep(3)  # time for any redelivered message to arrive and be turned away
    for job in (running, submitted):
        job.refresh_from_db()
        assert job.status == JobStatus.SUCCEEDED, job.error
        assert job.attempts == 1 and started_count(job) == 1


# --- An environment made slow: a lock held on lock.locks --------------------------------------------


@contextlib.contextmanager
def statement_timeout(env: Environment, ms: int) -> Iterator[None]:
    """The environment's page connections as BILLING_OPS_STATEMENT_TIMEOUT_MS=ms sets them."""
    connection = connections[env.alias]
    options = connection.settings_dict["OPTIONS"]
    saved = options["options"]
    connection.close()
    options["options"] = re.sub(r"statement_timeout=\d+", f"statement_timeout={ms}", saved)
    try:
        yield
    finally:
        connection.close()
        options["options"] = saved


def timed_get(client: Any, url: str) -> tuple[Any, float]:
    started = time.monotonic()
    response = client.get(url)
    return response, time.monotonic() - started


def test_an_environment_slowed_by_a_held_lock_is_marked_and_its_pages_answer_in_time(
    env, people, client_for, settings
) -> None:
    from tests.factories import make_locks, make_run

    make_run(env, 7)
    make_locks(env, 7, 5)
    settings.OVERVIEW_STATEMENT_TIMEOUT_MS = 1000
    viewer = client_for(people["viewer"])
    viewer.raise_request_exception = False
    stuck = reverse("stuck_runs", kwargs={"env_key": env.key})
    drill_down = reverse("run_detail", kwargs={"env_key": env.key, "run_id": 7})
    with locks_table_held(env), statement_timeout(env, 1000):
        overview, elapsed = timed_get(viewer, "/")
        assert overview.status_code == 200 and elapsed < 1 + 4, elapsed
        statuses = {row.status.env.key: row.status for row in overview.context["rows"]}
        assert not statuses[env.key].reachable and "statement timeout" in statuses[env.key].error
        assert statuses[env.key].verdict.colour == "red"
        assert all(s.reachable for key, s in statuses.items() if key != env.key)  # the others answer
        for url in (stuck, drill_down):
            response, elapsed = timed_get(viewer, url)
            text = response.content.decode()
            assert response.status_code == 503 and elapsed < 1 + 4, (url, elapsed)
            assert f'data-env-unavailable="{env.key}"' in text and "statement timeout" in text
        assert viewer.get(reverse("job_list")).status_code == 200  # the dashboard's own pages
    for url in (stuck, drill_down):
        assert viewer.get(url).status_code == 200


def test_a_lock_release_that_cannot_get_its_lock_fails_cleanly_and_a_rerun_finishes_it(
    env, people, settings, monkeypatch, inline_jobs
) -> None:
    from locks import release
    from tests.factories import make_locks, make_run

    monkeypatch.setattr(release, "LOCK_TIMEOUT_MS", 200)
    monkeypatch.setattr(release, "LOCK_TIMEOUT_RETRIES", 1)
    monkeypatch.setattr(release, "LOCK_TIMEOUT_BACKOFF_S", 0.1)
    make_run(env, 7)
    make_locks(env, 7, 30)
    plan = release.release_plan_prepare(actor=people["operator"], env=env, run_ids=[7], system_only=False)
    job = release.release_request(actor=people["operator"], plan_id=plan.pk, digest=plan.digest)
    with locks_table_held(env):
        services.job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("Batch 1 of run 7 waited over 200 ms for a lock 2 times"), job.error
    assert job.log_lines.filter(message__contains="waited over 200 ms for a lock; retrying").exists()
    assert query(env, "SELECT count(*) FROM lock.locks WHERE billing_id = 7") == [(30,)]  # nothing went

    plan = release.release_plan_prepare(actor=people["operator"], env=env, run_ids=[7], system_only=False)
    again = release.release_request(actor=people["operator"], plan_id=plan.pk, digest=plan.digest)
    services.job_execute(job_id=again.pk, worker="test")
    again.refresh_from_db()
    assert again.status == JobStatus.SUCCEEDED, again.error
    assert again.result["released"] == 30
    assert query(env, "SELECT count(*) FROM lock.locks WHERE billing_id = 7") == [(0,)]


# --- Full and unwritable folders --------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a filesystem of 64 KiB (tmpfs): a write past it fails with ENOSPC, as on
    a full disk. Mounting needs root, which CI has."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "full-disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def upload_page(client: Any, env: Environment, path: Path, run_id: str) -> str:
    with path.open("rb") as csv:
        response = client.post(
            reverse("upsert_new", kwargs={"env_key": env.key}),
            {"csv": csv, "run_id": run_id, "batch_size": 1000},
        )
    assert response.status_code == 200  # the form again, with the reason; not a 500, no job
    return response.content.decode()


def test_an_upload_to_a_full_disk_is_refused_with_the_reason_and_leaves_nothing(
    env, people, client_for, tmp_path, settings, full_disk
) -> None:
    settings.UPLOAD_DIR = full_disk / "uploads"
    path = lines_csv(tmp_path, 5_000)  # about 200 KB
    page = upload_page(client_for(people["operator"]), env, path, "full-1")
    assert "The upload could not be stored: No space left on device" in page
    assert not Job.objects.exists() and not UpsertRun.objects.exists()
    assert os.listdir(settings.UPLOAD_DIR) == []


def test_an_upload_folder_that_cannot_be_created_is_refused_with_the_reason(
    env, people, client_for, tmp_path, settings
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    settings.UPLOAD_DIR = blocker / "uploads"  # stops root too, unlike mode bits
    page = upload_page(client_for(people["operator"]), env, lines_csv(tmp_path, 10), "nodir-1")
    assert "The upload could not be stored: Not a directory" in page
    assert not Job.objects.exists() and blocker.read_text() == "not a folder"


def test_a_backup_to_a_full_disk_fails_clearly_and_keeps_nothing(
    env, people, settings, full_disk, inline_jobs
) -> None:
    from reconciliation import backups

    # Lines whose descriptions do not compress: the dump outgrows the 64 KiB disk.
    query(
        env,
        "INSERT INTO invoice_lines (invoice_id, unit_id, line_type, description, normalized_description,"
        " quantity, amount) SELECT 'INV-' || g, 'U', 'ENERGY', md5(g::text) || md5((g * 7)::text),"
        " md5(g::text) || md5((g * 7)::text), 1, 1 FROM generate_series(1, 5000) g",
    )
    settings.BACKUP_DIR = full_disk
    job = backups.backup_request(actor=people["operator"], env=env)
    services.job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and job.result is None
    assert "No space left on device" in job.error, job.error
    assert [p.name for p in full_disk.rglob("*") if p.is_file()] == []  # no partial dump left
    assert backups.backups_list(env) == []


# --- A second `make run` -------------------------------------------------------------------------------


def test_a_second_make_run_is_refused_and_names_the_first() -> None:
    from billing_ops import devstack
    from tests.conftest import BASE_DIR, free_port_for_tests

    try:
        first = devstack._run_lock()  # what the first `make run` holds for its whole life
    except SystemExit:
        first = None  # a real `make run` from this checkout holds it: the same case
    try:
        second = subprocess.run(
            [sys.executable, "-m", "billing_ops.devstack", "run"],
            cwd=BASE_DIR,
            env={**os.environ, "BILLING_OPS_PORT": str(free_port_for_tests())},
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        if first is not None:
            first.close()  # type: ignore[attr-defined]
    assert second.returncode != 0
    assert "Billing Ops is already running from this checkout" in second.stderr, second.stderr
    assert "starting the private" not in second.stdout  # refused before touching anything
