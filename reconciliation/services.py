"""Reconciliation as operator actions: request an upsert, run it as a job, settle it.

The form and ``manage.py batch_upsert`` both come here: the CSV is stored under
``settings.UPLOAD_DIR`` with a random name (outside the web root), its header checked,
the run id reserved, and a job recorded; the job runs ``reconciliation.upsert.batch_upsert``
and the stored file is removed once the job has settled, however it ended.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.translation import gettext as _

from audit.services import audit_record
from billing_ops import access
from billing_ops.environments import Environment, environment_connect, get_environment
from billing_ops.formats import grouped
from billing_ops.models import Job
from billing_ops.services import Actor, JobContext, JobRefused, job_request, user_of
from reconciliation.csvfile import CsvError, read_header
from reconciliation.models import UpsertRun, UpsertRunStatus
from reconciliation.upsert import (
    UpsertFailed,
    UpsertOutcome,
    UpsertRefused,
    batch_upsert,
    check_run_id,
    run_id_used_in,
)

logger = logging.getLogger(__name__)

UPSERT_KIND = "invoice_upsert"
STORE_CHUNK_BYTES = 1 << 20


# --- Uploaded files ----------------------------------------------------------------------------


def upload_store(chunks: Iterable[bytes]) -> tuple[str, str, int]:
    """Write an uploaded file under UPLOAD_DIR with a random name, enforcing the size limit
    while it arrives. Returns (stored name, sha256, size); nothing is left on error."""
    folder = Path(settings.UPLOAD_DIR)
    name = f"{secrets.token_hex(16)}.csv"
    path = folder / name
    digest = hashlib.sha256()
    size = 0
    limit = settings.RECONCILIATION_MAX_CSV_BYTES
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with path.open("xb") as f:
            os.chmod(path, 0o600)
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise ValidationError(
                        _("The file is larger than the limit of %(limit)s bytes.") % {"limit": grouped(limit)}
                    )
                digest.update(chunk)
                f.write(chunk)
    except OSError as exc:  # a full disk, a folder that cannot be made or written
        logger.error("could not store an upload in %s: %s", folder, exc)
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        raise ValidationError(
            _("The upload could not be stored: %(error)s") % {"error": exc.strerror}
        ) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return name, digest.hexdigest(), size


def upload_path(name: str) -> Path:
    """The stored file of that name; refuses anything but a name this module made."""
    if not (len(name) == 36 and name.endswith(".csv") and all(c in "0123456789abcdef" for c in name[:32])):
        raise ValueError(f"not a stored upload name: {name!r}")
    return Path(settings.UPLOAD_DIR) / name


def upload_preview(name: str, *, rows: int = 5, max_bytes: int = 64 * 1024) -> list[list[str]]:
    """The header and first data rows of a stored upload, for the approver (empty once removed)."""
    import csv
    import io

    try:
        with upload_path(name).open("rb") as f:
            head = f.read(max_bytes)
    except (ValueError, OSError):
        return []
    text = head.decode("utf-8-sig", errors="replace")
    if len(head) == max_bytes:
        text = text[: text.rfind("\n") + 1]  # whole lines only
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error:
        return []
    return [[cell[:120] for cell in record[:10]] for record in records[: rows + 1]]


def file_chunks(path: Path) -> Iterable[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(STORE_CHUNK_BYTES):
            yield chunk


# --- Requesting ----------------------------------------------------------------------------------


def upsert_request(
    *,
    actor: Actor,
    environment: str,
    chunks: Iterable[bytes],
    csv_name: str,
    run_id: str,
    batch_size: int,
    dry_run: bool,
) -> Job:
    """Store the CSV, check its header and the run id, and record the upsert job.

    Raises ValidationError (with the file's line and column where the header is wrong)
    and records nothing when refused.
    """
    access.require_operator(actor)
    env = get_environment(environment)
    try:
        check_run_id(run_id)
    except UpsertRefused as exc:
        raise ValidationError(str(exc)) from None
    if batch_size < 1:
        raise ValidationError(_("The batch size must be at least 1."))
    if not dry_run:
        _require_unused_run_id(env, run_id)
    try:
        stored, sha256, size = upload_store(chunks)
    except ValidationError as exc:  # too big, or the folder failed: say which file
        raise ValidationError(f"{csv_name}: {' '.join(exc.messages)}") from None
    path = upload_path(stored)
    try:
        read_header(path, name=csv_name, max_bytes=settings.RECONCILIATION_MAX_CSV_BYTES)
        params = {
            "run_id": run_id,
            "batch_size": batch_size,
            "dry_run": dry_run,
            "csv_name": csv_name,
            "csv_sha256": sha256,
            "csv_bytes": size,
            "upload": stored,
        }
        with transaction.atomic():
            job = job_request(
                actor=actor,
                kind=UPSERT_KIND,
                environment=env.key,
                params=params,
                claims=[f"upsert:{env.key}:{run_id}"],
            )
            try:
                with transaction.atomic():
                    UpsertRun.objects.create(
                        environment=env.key,
                        run_id=run_id,
                        dry_run=dry_run,
                        job=job,
                        requested_by=user_of(actor),
                        status=UpsertRunStatus.PENDING,
                        csv_name=csv_name[:500],
                        csv_sha256=sha256,
                        csv_bytes=size,
                        batch_size=batch_size,
                    )
            except IntegrityError:
                raise ValidationError(_run_id_taken(run_id)) from None
    except CsvError as exc:
        path.unlink(missing_ok=True)
        raise ValidationError(str(exc)) from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return job


def _run_id_taken(run_id: str) -> str:
    return _("Run id %(run_id)s was already used in this environment; a retry needs a new run id.") % {
        "run_id": run_id
    }


def _require_unused_run_id(env: Environment, run_id: str) -> None:
    if UpsertRun.objects.filter(environment=env.key, run_id=run_id, dry_run=False).exists():
        raise ValidationError(_run_id_taken(run_id))


# --- Running ---------------------------------------------------------------------------------------


def upsert_execute(ctx: JobContext) -> dict[str, Any]:
    """The job: run the upsert in the environment and keep its outcome on the run."""
    assert ctx.env is not None
    params = ctx.params
    run = UpsertRun.objects.get(job_id=ctx.job_id)
    UpsertRun.objects.filter(pk=run.pk).update(status=UpsertRunStatus.RUNNING, started_at=timezone.now())
    path = upload_path(params["upload"])
    outcome = run_upsert(
        connect=lambda: environment_connect(ctx.env, application_name=f"billing-ops upsert job {ctx.job_id}"),
        run=run,
        csv_path=path,
        report=ctx,  # a JobContext logs, reports progress and checks for a cancel
    )
    return outcome.as_result()


def run_upsert(*, connect: Any, run: UpsertRun, csv_path: Path, report: Any) -> UpsertOutcome:
    """Run one recorded upsert; the run row ends succeeded or failed, with what happened."""
    started = time.monotonic()
    try:
        header = read_header(csv_path, name=run.csv_name, max_bytes=settings.RECONCILIATION_MAX_CSV_BYTES)
        with connect() as conn:
            outcome = batch_upsert(
                conn,
                csv_path=csv_path,
                csv_name=run.csv_name,
                header=header,
                run_id=run.run_id,
                batch_size=run.batch_size,
                dry_run=run.dry_run,
                report=report,
            )
    except (CsvError, UpsertRefused, UpsertFailed) as exc:
        _run_failed(run, str(exc), started)
        report.log(f"[batch_upsert] ROLLBACK: {exc}. Nothing was committed.")
        raise JobRefused(f"{exc}. Nothing was committed.") from None
    except BaseException as exc:  # a cancel, a dropped connection, a bug: its transaction rolled back
        _run_failed(run, f"{type(exc).__name__}: {exc}. Nothing was committed.", started)
        report.log(f"[batch_upsert] ROLLBACK: {type(exc).__name__}: {exc}. Nothing was committed.")
        raise
    UpsertRun.objects.filter(pk=run.pk).update(
        status=UpsertRunStatus.SUCCEEDED,
        rows_streamed=outcome.rows_streamed,
        inserted=outcome.inserted,
        updated=outcome.updated,
        unchanged=outcome.unchanged,
        duplicates=outcome.duplicates,
        duration_ms=outcome.duration_ms,
        finished_at=timezone.now(),
    )
    return outcome


def _run_failed(run: UpsertRun, error: str, started: float) -> None:
    UpsertRun.objects.filter(pk=run.pk).update(
        status=UpsertRunStatus.FAILED,
        error=error[:4000],
        duration_ms=round((time.monotonic() - started) * 1000),
        finished_at=timezone.now(),
    )


def upsert_settled(job: Job) -> None:
    """However the job ended (refused, cancelled, worker lost): the run says so, the file goes."""
    UpsertRun.objects.filter(job=job, status__in=[UpsertRunStatus.PENDING, UpsertRunStatus.RUNNING]).update(
        status=UpsertRunStatus.FAILED,
        error=(
            job.error or _("The job ended as %(status)s before the upsert finished.") % {"status": job.status}
        )[:4000]
        + " "
        + _("Nothing was committed."),
        finished_at=timezone.now(),
    )
    name = (job.params or {}).get("upload")
    if name:
        try:
            upload_path(name).unlink(missing_ok=True)
        except (ValueError, OSError):
            logger.exception("could not remove the upload of job %s", job.pk)


# --- Outside the configured environments (manage.py batch_upsert --database-url) ------------------


def adhoc_target(url: str) -> str:
    """How a database given by URL is named in records: host, port and database, never credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
        raise ValueError("the database URL must look like postgresql://user:password@host:port/dbname")
    return f"url:{parts.hostname}:{parts.port or 5432}{parts.path or '/'}"[:200]


def adhoc_upsert(
    *, actor: Actor, url: str, csv_path: Path, run_id: str, batch_size: int, dry_run: bool, report: Any
) -> UpsertOutcome:
    """The same upsert against a database that is not a configured environment (runbook §3's
    ``--database-url``): run here, recorded as a run of ``url:host:port/db``."""
    import psycopg

    access.require_operator(actor)
    target = adhoc_target(url)
    check_run_id(run_id)
    read_header(csv_path, max_bytes=settings.RECONCILIATION_MAX_CSV_BYTES)  # fail fast, before connecting
    sha256, size = file_digest(csv_path)

    def connect() -> Any:
        return psycopg.connect(
            url, connect_timeout=settings.CONNECT_TIMEOUT_S, application_name="billing-ops batch_upsert"
        )

    if not dry_run:
        with connect() as conn, conn.cursor() as cur:
            if run_id_used_in(cur, run_id):
                raise UpsertRefused(
                    f"run id {run_id!r} already has audit rows in this database (runbook §5.3)"
                )
    try:
        run = UpsertRun.objects.create(
            environment=target,
            run_id=run_id,
            dry_run=dry_run,
            requested_by=user_of(actor),
            status=UpsertRunStatus.RUNNING,
            csv_name=csv_path.name,
            csv_sha256=sha256,
            csv_bytes=size,
            batch_size=batch_size,
        )
    except IntegrityError:
        raise UpsertRefused(_run_id_taken(run_id)) from None
    try:
        outcome = run_upsert(connect=connect, run=run, csv_path=csv_path, report=report)
    finally:
        run.refresh_from_db()
        audit_record(
            actor=actor,
            action="upsert.adhoc",
            environment=target,
            object_type="upsert_run",
            object_id=run.pk,
            params={"run_id": run_id, "batch_size": batch_size, "dry_run": dry_run, "csv_sha256": sha256},
            outcome={
                "status": run.status,
                "inserted": run.inserted,
                "updated": run.updated,
                "error": run.error,
            },
        )
    return outcome


def file_digest(path: Path) -> tuple[str, int]:
    """sha256 (hex) and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    for chunk in file_chunks(path):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size
