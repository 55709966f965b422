"""Thin Celery tasks: fetch by id, call one service."""

from __future__ import annotations

from celery import Task, shared_task

from billing_ops import services
from billing_ops.notifications import notifications_deliver_due


@shared_task(name="billing_ops.tasks.run_job", bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job(self: Task, job_id: int) -> str:
    return services.job_execute(job_id=job_id, worker=self.request.hostname)


@shared_task(name="billing_ops.tasks.sweep_jobs", ignore_result=True)
def sweep_jobs() -> dict[str, list[int]]:
    report = services.jobs_sweep()
    return report.__dict__


@shared_task(name="billing_ops.tasks.deliver_notifications", ignore_result=True)
def deliver_notifications() -> dict[str, list[int]]:
    return notifications_deliver_due().__dict__
