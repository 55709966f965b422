"""The kinds of job the dashboard runs, and the rules that depend on the kind.

A kind names its handler by dotted path (resolved when the job runs, so that apps do not
import each other at start-up). A handler is a plain service function taking the
``JobContext`` and returning a JSON-serialisable result.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.utils.functional import Promise
from django.utils.translation import gettext_lazy as _

from billing_ops.environments import Environment


@dataclass(frozen=True)
class JobKind:
    name: str
    label: str | Promise
    handler: str
    # Destructive kinds need an approver in protected environments.
    destructive: bool = False
    # Some kinds (rollbacks) need an approver everywhere.
    always_needs_approval: bool = False
    # A resumable job whose worker died is queued again by the sweeper; others fail.
    resumable: bool = False
    max_attempts: int = 3
    # What a user should know when the worker died under this kind of job.
    worker_lost_note: str | Promise = ""
    # Dotted path of a callable(job) run once the job has settled (notify, audit).
    on_settled: str = ""
    # Dotted path of a callable(job, user) -> dict adding what the job page shows for this
    # kind (e.g. the release preview an approver must see), rendered by
    # billing_ops/details/<kind>.html.
    detail_context: str = ""
    # Dotted path of a callable(job) run when an approver approves, in the approval's
    # transaction; it raises ValidationError when the job may no longer be approved (e.g.
    # the data changed since the preview the request was made from).
    approval_check: str = ""
    # The kind may also run with no environment (``environment`` ""): it then works on the
    # dashboard's own database (the verification of the dashboard's audit trail).
    without_environment: bool = False

    def needs_approval(self, env: Environment | None) -> bool:
        if self.always_needs_approval:
            return True
        return self.destructive and env is not None and env.protected


REGISTRY: dict[str, JobKind] = {}


def register(kind: JobKind) -> JobKind:
    if kind.name in REGISTRY:
        raise ValueError(f"job kind {kind.name!r} registered twice")
    REGISTRY[kind.name] = kind
    return kind


def get_kind(name: str) -> JobKind:
    try:
        return REGISTRY[name]
    except KeyError:
        raise LookupError(f"unknown job kind {name!r}") from None


def kind_label(name: str) -> str | Promise:
    """The kind's label, or its name if the kind is no longer configured."""
    kind = REGISTRY.get(name)
    return kind.label if kind else name


ENVIRONMENT_CHECK = register(
    JobKind(
        name="environment_check",
        label=_("Environment check"),
        handler="billing_ops.services.environment_check",
        resumable=True,
        worker_lost_note=_("The check only reads; it is safe to run again."),
    )
)


LOCK_RELEASE = register(
    JobKind(
        name="lock_release",
        label=_("Lock release"),
        handler="locks.release.lock_release_execute",
        destructive=True,
        resumable=True,
        on_settled="locks.release.release_settled",
        detail_context="locks.views.release_job_detail_context",
        worker_lost_note=_(
            "Every finished batch is committed and recorded; running it again continues with what is left."
        ),
    )
)

LOCK_RESTORE = register(
    JobKind(
        name="lock_restore",
        label=_("Restore released locks"),
        handler="locks.release.lock_restore_execute",
        resumable=True,
        on_settled="locks.release.restore_settled",
        worker_lost_note=_("The restore is one transaction: nothing was restored; it is safe to run again."),
    )
)


# --- Reconciliation: the runbook's checks and repairs on public.invoice_lines ----------------

DUPLICATE_PRECHECK = register(
    JobKind(
        name="duplicate_precheck",
        label=_("Duplicate precheck"),
        handler="reconciliation.duplicates.duplicate_precheck_execute",
        resumable=True,
        worker_lost_note=_("The precheck only reads; it is safe to run again."),
    )
)

DUPLICATE_RESOLVE = register(
    JobKind(
        name="duplicate_resolve",
        label=_("Resolve duplicate lines"),
        handler="reconciliation.duplicates.duplicate_resolve_execute",
        destructive=True,
        always_needs_approval=True,
        detail_context="reconciliation.views.duplicate_resolve_detail_context",
        worker_lost_note=_(
            "The delete is one transaction: either all of it or nothing was committed. "
            "Run a new duplicate precheck to see which."
        ),
    )
)

INDEX_CHECK = register(
    JobKind(
        name="index_check",
        label=_("Index check"),
        handler="reconciliation.indexes.index_check_execute",
        resumable=True,
        worker_lost_note=_("The check only reads the catalogs; it is safe to run again."),
    )
)

INDEX_CREATE = register(
    JobKind(
        name="index_create",
        label=_("Create indexes"),
        handler="reconciliation.indexes.index_create_execute",
        destructive=True,
        worker_lost_note=_(
            "A CONCURRENTLY build that was interrupted leaves an invalid index; "
            "running index creation again drops and rebuilds it."
        ),
    )
)

INVOICE_UPSERT = register(
    JobKind(
        name="invoice_upsert",
        label=_("Upsert missing invoice lines"),
        handler="reconciliation.services.upsert_execute",
        destructive=True,
        on_settled="reconciliation.services.upsert_settled",
        detail_context="reconciliation.views.upsert_job_detail_context",
        worker_lost_note=_(
            "The upsert is one transaction: nothing was committed. Run it again with a new run id."
        ),
    )
)

# --- Reconciliation: backup, artifact validation, post-upsert verification (runbook §1.1, §1.3, §4)

DATABASE_BACKUP = register(
    JobKind(
        name="database_backup",
        label=_("Database backup"),
        handler="reconciliation.backups.backup_create",
        worker_lost_note=_(
            "No backup was kept: a dump gets its final name only after it has been verified. "
            "Its temporary file is removed by the next backup; request a new one."
        ),
    )
)

ARTIFACT_VALIDATE = register(
    JobKind(
        name="artifact_validate",
        label=_("Artifact validation"),
        handler="reconciliation.artifacts.artifact_validate",
        resumable=True,
        worker_lost_note=_("The validation only reads files; it is safe to run again."),
    )
)

UPSERT_VERIFY = register(
    JobKind(
        name="upsert_verify",
        label=_("Post-upsert verification"),
        handler="reconciliation.verification.upsert_verify",
        resumable=True,
        worker_lost_note=_("The verification only reads; it is safe to run again."),
    )
)

UPSERT_ROLLBACK = register(
    JobKind(
        name="upsert_rollback",
        label=_("Roll back an upsert run"),
        handler="reconciliation.rollback.rollback_execute",
        destructive=True,
        always_needs_approval=True,
        on_settled="reconciliation.rollback.rollback_settled",
        detail_context="reconciliation.views.rollback_job_detail_context",
        approval_check="reconciliation.rollback.rollback_approval_check",
        worker_lost_note=_(
            "The rollback is one transaction: nothing was committed. Request it again from a new preview."
        ),
    )
)

# --- Reconciliation: full restore from a backup (runbook §6.1) ----------------------------------

DATABASE_RESTORE = register(
    JobKind(
        name="database_restore",
        label=_("Database restore"),
        handler="reconciliation.restore.restore_execute",
        destructive=True,
        # An approver asks, another approver approves: in every environment.
        always_needs_approval=True,
        detail_context="reconciliation.views.restore_job_detail_context",
        worker_lost_note=_(
            "pg_restore runs as one transaction: either the whole backup was restored or nothing. "
            "The job could not record which: compare the environment's row counts (Environment check) "
            "with the backup's before requesting it again."
        ),
    )
)

# --- Audit: hash chain verification (runbook §5.4) ------------------------------------------

CHAIN_VERIFY = register(
    JobKind(
        name="chain_verify",
        label=_("Audit chain verification"),
        handler="audit.verification.chain_verify_execute",
        resumable=True,
        without_environment=True,
        worker_lost_note=_("The verification only reads; it is safe to run again."),
    )
)
