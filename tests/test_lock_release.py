"""Lock cleanup: preview, guards, the batched delete, resume and restore (in-process)."""

from __future__ import annotations

from datetime import datetime, timedelta
from io import StringIO

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections

from billing_ops import services
from billing_ops.models import Job, JobClaim, JobStatus
from locks import release
from locks.models import LockReleaseBatch, LockReleasePlan
from tests.conftest import make_user
from tests.factories import make_locks, make_run

# The preview reads the environment on a connection of its own: data must be committed.
pytestmark = [
    pytest.mark.django_db(databases="__all__", transaction=True),
    pytest.mark.usefixtures("inline_jobs"),
]


def lock_ids(env, where: str = "TRUE") -> set[str]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(f"SELECT id FROM lock.locks WHERE {where}")
        return {row[0] for row in cursor.fetchall()}


def lock_rows(env) -> set[tuple]:
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT id, lock_key, entity_type, entity_id, billing_id, system_lock FROM lock.locks")
        return set(cursor.fetchall())


def set_status(env, run_id: int, status: str, modified: datetime | None = None) -> None:
    with connections[env.alias].cursor() as cursor:
        cursor.execute(
            "UPDATE billing.billings SET status = %s::text::billing.billing_status, modify_date = %s"
            " WHERE id = %s",
            [status, modified or datetime.utcnow(), run_id],
        )


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(release, "BATCH_SIZE_ROWS", 10)


@pytest.fixture
def env_with_runs(unprotected_env, clean_environments):
    env = unprotected_env
    make_run(env, 1)
    make_locks(env, 1, 30, system=True)
    make_locks(env, 1, 5, system=False, entity_type="customers")
    make_run(env, 2)  # another stuck run: must not be touched when only run 1 is chosen
    make_locks(env, 2, 7)
    make_locks(env, None, 4, system=False, entity_type="customers")  # no run: never touched
    return env


def prepare_and_run(actor, env, runs, *, system_only=False):
    plan = release.release_plan_prepare(actor=actor, env=env, run_ids=runs, system_only=system_only)
    job = release.release_request(actor=actor, plan_id=plan.pk, digest=plan.digest)
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.SUCCEEDED, Job.objects.get(
        pk=job.pk
    ).error
    return plan, Job.objects.get(pk=job.pk)


def test_only_the_chosen_runs_locks_go(operator, env_with_runs, small_batches) -> None:
    env = env_with_runs
    others = lock_ids(env, "billing_id IS DISTINCT FROM 1")
    plan, job = prepare_and_run(operator, env, [1])
    assert plan.lock_count == 35 and LockReleaseBatch.objects.filter(plan=plan).count() == 4
    assert lock_ids(env, "billing_id = 1") == set()
    assert lock_ids(env) == others  # run 2's and the NULL-billing locks are all still there
    assert job.result["released"] == 35 and job.result["gone"] == 0
    assert job.result["by_entity_type"]["customers"] >= 5
    assert job.progress_done == job.progress_total == 35
    assert not JobClaim.objects.exists()  # a settled job holds nothing


def test_system_only_leaves_user_locks(operator, env_with_runs) -> None:
    env = env_with_runs
    plan, job = prepare_and_run(operator, env, [1], system_only=True)
    assert plan.lock_count == 30 and job.result["released"] == 30
    assert len(lock_ids(env, "billing_id = 1 AND NOT system_lock")) == 5
    assert lock_ids(env, "billing_id = 1 AND system_lock") == set()


def test_a_lock_added_or_changed_after_the_preview_is_not_deleted(operator, env_with_runs) -> None:
    env = env_with_runs
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=False)
    make_locks(env, 1, 2, prefix="late")  # appeared since the preview
    with connections[env.alias].cursor() as cursor:  # changed since the preview
        cursor.execute("UPDATE lock.locks SET system_lock = NOT system_lock WHERE id = 'r1-s-mix-3'")
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    services.job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert lock_ids(env, "billing_id = 1") == {"late-1", "late-2", "r1-s-mix-3"}
    assert job.result["released"] == 34 and job.result["gone"] == 1


def test_a_lock_whose_values_changed_in_place_is_left_alone(operator, env_with_runs) -> None:
    env = env_with_runs
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=False)
    with connections[env.alias].cursor() as cursor:  # same rows, one value differs
        cursor.execute("UPDATE lock.locks SET entity_id = entity_id || '-x' WHERE id = 'r1-s-mix-3'")
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    services.job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert lock_ids(env, "billing_id = 1") == {"r1-s-mix-3"}
    assert job.result["released"] == 34 and job.result["gone"] == 1


def _xmin_of(env, lock_id: str) -> int:
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT xmin::text::bigint FROM lock.locks WHERE id = %s", [lock_id])
        return cursor.fetchone()[0]


@pytest.mark.parametrize("system_only", [False, True])
@pytest.mark.parametrize("change", ["none", "horizon", "table rewritten"])
def test_a_batch_whose_tuples_may_not_be_the_previewed_ones_is_compared_row_by_row(
    operator, env_with_runs, monkeypatch, change, system_only
) -> None:
    # The fast path trusts a tuple at a planned ctid only if it is older than the preview's
    # snapshot and in the same table file. Both checks are proven directly: the plan's
    # horizon is moved back to the transaction that inserted a planned row (so that row
    # counts as newer than the preview), or VACUUM FULL moves every tuple to a new file.
    # Either way the batch must take the exact path, and still release every planned row.
    env = env_with_runs
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=system_only)
    if change == "horizon":
        LockReleasePlan.objects.filter(pk=plan.pk).update(xmin_horizon=_xmin_of(env, "r1-s-mix-3"))
    elif change == "table rewritten":
        with connections[env.alias].cursor() as cursor:
            cursor.execute("VACUUM FULL lock.locks")
    exact_path: list[int] = []
    load_plan = release._load_plan
    monkeypatch.setattr(release, "_load_plan", lambda *a, **k: (exact_path.append(1), load_plan(*a, **k)))
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    services.job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    left = lock_ids(env, "billing_id = 1 AND NOT system_lock") if system_only else set()
    assert lock_ids(env, "billing_id = 1") == left and job.result["released"] == 35 - len(left)
    assert job.result["by_entity_type"] == plan.summary["by_entity_type"]
    assert exact_path == ([] if change == "none" else [1])
    said = [line.message for line in job.log_lines.all() if "row by row" in line.message]
    assert len(said) == (0 if change == "none" else 1)  # env_with_runs: one batch for run 1


def test_a_new_lock_in_a_planned_locks_old_place_is_not_deleted(operator, env_with_runs) -> None:
    # The platform deletes a planned lock, VACUUM frees its line pointer, and a new lock of
    # the same run is stored at exactly that ctid: the job must not take it for the old one.
    env = env_with_runs
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=False)
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT ctid::text FROM lock.locks WHERE id = 'r1-s-mix-3'")
        planned_place = cursor.fetchone()[0]
        cursor.execute("DELETE FROM lock.locks WHERE id = 'r1-s-mix-3'")
        cursor.execute("VACUUM lock.locks")
    make_locks(env, 1, 1, prefix="late")
    with connections[env.alias].cursor() as cursor:
        cursor.execute("SELECT ctid::text FROM lock.locks WHERE id = 'late-1'")
        assert cursor.fetchone()[0] == planned_place  # PostgreSQL reused the freed slot
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    services.job_execute(job_id=job.pk, worker="test")
    job.refresh_from_db()
    assert lock_ids(env, "billing_id = 1") == {"late-1"}
    assert job.result["released"] == 34 and job.result["gone"] == 1


def test_a_run_that_is_running_again_is_skipped_with_the_reason(
    operator, env_with_runs, small_batches
) -> None:
    env = env_with_runs
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1, 2], system_only=False)
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    set_status(env, 2, "IN_PROGRESS_ACCOUNTING")  # the platform picked run 2 up again
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.SUCCEEDED
    job.refresh_from_db()
    assert lock_ids(env, "billing_id = 1") == set() and len(lock_ids(env, "billing_id = 2")) == 7
    assert "still running" in job.result["skipped_runs"]["2"]
    assert job.log_lines.filter(message__contains="Run 2: stopped").exists()


def claimed_release(operator, env, *, after_first_batch):
    """A release of run 1, claimed and ready to execute in this process, whose context calls
    ``after_first_batch(job)`` once, when its first batch is done."""
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=False)
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    ctx = services.JobContext(services.job_claim(job_id=job.pk, worker="test"), env)
    report = ctx.progress
    fired: list[bool] = []

    def progress(done, total=None, message=""):
        report(done, total, message)
        if done and not fired:  # the first report with progress follows the first batch
            fired.append(True)
            after_first_batch(job)

    ctx.progress = progress  # type: ignore[method-assign]
    return plan, ctx


def test_a_status_change_between_batches_stops_that_run(operator, env_with_runs, small_batches) -> None:
    env = env_with_runs
    plan, ctx = claimed_release(
        operator, env, after_first_batch=lambda job: set_status(env, 1, "IN_PROGRESS_ACCOUNTING")
    )
    result = release.lock_release_execute(ctx)
    assert result["released"] == 10
    assert len(lock_ids(env, "billing_id = 1")) == 25
    assert LockReleaseBatch.objects.filter(plan=plan, status="skipped").count() == 3


def test_ineligible_runs_are_left_out_of_the_preview_with_reasons(
    operator, unprotected_env, clean_environments
):
    env = unprotected_env
    make_run(env, 10)
    make_locks(env, 10, 3)
    make_run(env, 11, status="IN_PROGRESS_ACCOUNTING", modified=datetime.utcnow())
    make_locks(env, 11, 3)
    old = datetime.utcnow() - timedelta(days=2)
    make_run(env, 12, status="IN_PROGRESS_ACCOUNTING", created=old, modified=old)
    make_locks(env, 12, 3)
    make_run(env, 13, status="GENERATED")
    make_locks(env, 13, 3)
    make_run(env, 14, status="DRAFT")
    make_locks(env, 14, 3)
    plan = release.release_plan_prepare(
        actor=operator, env=env, run_ids=[10, 11, 12, 13, 14, 99], system_only=False
    )
    assert sorted(plan.summary["runs"]) == ["10", "12", "13"]
    assert "still running" in plan.summary["refused"]["11"]
    assert "DRAFT" in plan.summary["refused"]["14"]
    assert plan.summary["refused"]["99"] == "no such billing run"
    assert release.eligible_run_ids(env) == [10, 12, 13]
    with pytest.raises(ValidationError, match="still running"):
        release.release_plan_prepare(actor=operator, env=env, run_ids=[11], system_only=False)


def test_two_requests_for_the_same_run_one_is_refused_naming_the_other(operator, env_with_runs) -> None:
    env = env_with_runs
    first = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=False)
    second = release.release_plan_prepare(actor=operator, env=env, run_ids=[1, 2], system_only=True)
    job = release.release_request(actor=operator, plan_id=first.pk, digest=first.digest)
    with pytest.raises(services.JobConflict, match=f"Job #{job.pk}"):
        release.release_request(actor=operator, plan_id=second.pk, digest=second.digest)
    assert Job.objects.count() == 1
    assert LockReleasePlan.objects.get(pk=second.pk).status == "draft"


def test_a_protected_release_waits_for_another_approver(protected_env, clean_environments) -> None:
    env = protected_env
    make_run(env, 5)
    make_locks(env, 5, 12)
    admin = make_user("admin1", "Operator", "Approver")
    approver = make_user("approver1", "Approver")
    plan = release.release_plan_prepare(actor=admin, env=env, run_ids=[5], system_only=False)
    confirmation = env.label if env.confirm_name else ""
    if env.confirm_name:
        with pytest.raises(ValidationError, match="Type the environment's name"):
            release.release_request(actor=admin, plan_id=plan.pk, digest=plan.digest, confirmation="prod?")
    job = release.release_request(actor=admin, plan_id=plan.pk, digest=plan.digest, confirmation=confirmation)
    assert job.status == JobStatus.AWAITING_APPROVAL
    with pytest.raises(PermissionDenied):
        services.job_approve(actor=admin, job_id=job.pk, digest=job.params_digest)
    services.job_approve(actor=approver, job_id=job.pk, digest=job.params_digest)
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.SUCCEEDED
    assert lock_ids(env, "billing_id = 5") == set()


def test_batches_altered_after_approval_delete_nothing(operator, env_with_runs) -> None:
    env = env_with_runs
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=False)
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    LockReleaseBatch.objects.filter(plan=plan).update(tids='{"(0,1)"}')  # point it elsewhere
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.FAILED
    assert "do not match" in Job.objects.get(pk=job.pk).error
    assert len(lock_ids(env, "billing_id = 1")) == 35 and len(lock_ids(env, "billing_id = 2")) == 7


def test_plan_rows_altered_after_approval_change_nothing_that_goes_and_block_the_restore(
    operator, env_with_runs
) -> None:
    env = env_with_runs
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=False)
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    plan.items.filter(lock_id="r1-s-mix-1").update(lock_id="r2-s-mix-1")  # point it at another run's lock
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.SUCCEEDED
    # What went is what was approved (the batch digests are checked against the rows
    # themselves), not what the altered record says; run 2 keeps all its locks.
    assert lock_ids(env, "billing_id = 1") == set() and len(lock_ids(env, "billing_id = 2")) == 7
    restore = release.restore_request(actor=make_user("approver1", "Approver"), release_job_id=job.pk)
    assert services.job_execute(job_id=restore.pk, worker="test") == JobStatus.FAILED
    assert "changed since the release" in Job.objects.get(pk=restore.pk).error


def test_a_stale_preview_cannot_be_requested(operator, env_with_runs) -> None:
    plan = release.release_plan_prepare(actor=operator, env=env_with_runs, run_ids=[1], system_only=False)
    with pytest.raises(ValidationError, match="preview changed"):
        release.release_request(actor=operator, plan_id=plan.pk, digest="0" * 64)
    other = make_user("operator9", "Operator")
    with pytest.raises(PermissionDenied):
        release.release_request(actor=other, plan_id=plan.pk, digest=plan.digest)


def test_a_resumed_job_finishes_without_double_counting(operator, env_with_runs, small_batches) -> None:
    env = env_with_runs
    plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[1], system_only=False)
    job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    # As if a worker died: batch 0 finished, batch 1 deleted its rows but died before saying so.
    batches = list(LockReleaseBatch.objects.filter(plan=plan).order_by("batch_no"))
    for batch, state in ((batches[0], "done"), (batches[1], "deleting")):
        ids = sorted(plan.items.filter(batch_no=batch.batch_no).values_list("lock_id", flat=True))
        with connections[env.alias].cursor() as cursor:
            if state == "deleting":  # one of its rows changed meanwhile: not released, reported
                flip = "UPDATE lock.locks SET system_lock = NOT system_lock WHERE id = %s"
                cursor.execute(flip, [ids.pop()])
            cursor.execute("DELETE FROM lock.locks WHERE id = ANY(%s)", [ids])
        LockReleaseBatch.objects.filter(pk=batch.pk).update(
            status=state, deleted_count=len(ids) if state == "done" else 0
        )
    assert services.job_execute(job_id=job.pk, worker="test") == JobStatus.SUCCEEDED
    job.refresh_from_db()
    assert job.result["released"] == 34 and job.result["gone"] == 1
    assert len(lock_ids(env, "billing_id = 1")) == 1
    assert job.log_lines.filter(message__contains="Resuming").exists()


def test_restore_puts_back_exactly_what_was_released(operator, env_with_runs) -> None:
    env = env_with_runs
    before = lock_rows(env)
    _plan, job = prepare_and_run(operator, env, [1])
    approver = make_user("approver1", "Approver")
    with pytest.raises(PermissionDenied):
        release.restore_request(actor=operator, release_job_id=job.pk)
    restore = release.restore_request(actor=approver, release_job_id=job.pk)
    assert services.job_execute(job_id=restore.pk, worker="test") == JobStatus.SUCCEEDED
    restore.refresh_from_db()
    assert restore.result["restored"] == 35 and restore.result["skipped_existing"] == 0
    assert lock_rows(env) == before
    with pytest.raises(ValidationError, match="Already restored"):
        release.restore_request(actor=approver, release_job_id=job.pk)


def test_the_command_prints_the_preview_and_a_dry_run_changes_nothing(operator, env_with_runs) -> None:
    out = StringIO()
    call_command(
        "release_locks",
        "--env",
        env_with_runs.key,
        "--run",
        "1",
        "--dry-run",
        "--actor",
        "operator1",
        stdout=out,
    )
    assert "35 locks of 1 run(s)" in out.getvalue() and "Dry run" in out.getvalue()
    assert len(lock_ids(env_with_runs, "billing_id = 1")) == 35 and Job.objects.count() == 0


def test_the_command_releases_all_eligible_runs(operator, env_with_runs) -> None:
    out = StringIO()
    call_command(
        "release_locks",
        "--env",
        env_with_runs.key,
        "--all-eligible",
        "--system-only",
        "--actor",
        "operator1",
        stdout=out,
    )
    assert "released 37 of 37 locks" in out.getvalue()
    assert len(lock_ids(env_with_runs, "billing_id IS NOT NULL")) == 5  # run 1's user locks


def test_the_command_exits_non_zero_when_refused(viewer, operator, env_with_runs) -> None:
    with pytest.raises(CommandError, match="operators"):
        call_command("release_locks", "--env", env_with_runs.key, "--run", "1", "--actor", "viewer1")
    with pytest.raises(CommandError, match="no such billing run"):
        call_command("release_locks", "--env", env_with_runs.key, "--run", "77", "--actor", "operator1")
    with pytest.raises(CommandError, match="unknown environment"):
        call_command("release_locks", "--env", "nope", "--run", "1", "--actor", "operator1")


def test_a_cancel_stops_between_batches_and_keeps_what_was_done(
    operator, env_with_runs, small_batches
) -> None:
    env = env_with_runs
    # After the first batch, someone presses Cancel.
    plan, ctx = claimed_release(
        operator,
        env,
        after_first_batch=lambda job: Job.objects.filter(pk=job.pk).update(cancel_requested=True),
    )
    with pytest.raises(services.JobCancelled):
        release.lock_release_execute(ctx)
    assert LockReleaseBatch.objects.filter(plan=plan, status="done").count() == 1
    assert len(lock_ids(env, "billing_id = 1")) == 25
    assert release.release_result(plan)["released"] == 10


def test_a_release_notifies_the_configured_channels(operator, env_with_runs, settings) -> None:
    from billing_ops.models import Notification

    settings.ALERT_EMAILS = ["ops@example.test"]
    prepare_and_run(operator, env_with_runs, [1])
    note = Notification.objects.get(channel="email")
    assert env_with_runs.label in note.subject and "succeeded" in note.subject
    assert "Locks released: 35 of 35 planned" in note.body and "Requested by operator1" in note.body
