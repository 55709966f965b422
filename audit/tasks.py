"""Thin Celery tasks of the audit trail (scheduled by beat; see settings)."""

from __future__ import annotations

from celery import shared_task

from audit.verification import chain_verify_scheduled_run


@shared_task(name="audit.tasks.scheduled_chain_verify", ignore_result=True)
def scheduled_chain_verify() -> list[str]:
    """Request a verification of every chain (see audit.verification)."""
    return chain_verify_scheduled_run()
