"""Full restore of an environment from one of its verified backups (runbook §6.1), the
stakeholder notice after it (§6.3), and its record in the dashboard's audit trail.

**Who and where.** An approver requests it, typing the environment's label and giving a
reason; another approver approves it (``always_needs_approval``; ``job_approve`` refuses the
requester). It is refused in a *protected* environment unless its configuration says
``allow_restore = true`` (the issue: "never for the demo's protected environments unless
explicitly enabled"; the rule cannot be weaker for a deployment's protected environments
than for the demo's). Unprotected environments (Test, Dev) may be restored without the flag:
resetting them is what restores are for there. Only a backup the dashboard verified (its
manifest, for the file's size) can be chosen, and the request pins its sha256: a file that
changed after the approval is refused before anything is touched.

**The restore.** ``pg_restore --clean --if-exists --no-owner --single-transaction
--exit-on-error`` into the environment: every object of the archive is dropped and
recreated with the archive's rows, in one transaction. Any error rolls the whole of it
back, so a failed restore leaves the database exactly as it was; the job then says so and
counts the rows again to show it. Objects created after the backup that are not in the
archive are left alone (pg_restore drops only what it restores); one that depends on a
restored table (a view, a foreign key) makes the DROP fail, and with it the restore. The
password reaches pg_restore through the backup's 0600 passfile, never its command line.

**Application connections.** The DROPs need ACCESS EXCLUSIVE locks, and the archive itself
sets ``lock_timeout = 0`` (so a lock_timeout given to the session would be overridden and
the restore would wait for ever behind an open transaction). Before it starts, the job lists
every other session connected to the database; while it runs, a watcher looks at the
restore's backend (found by its ``application_name``) every ``backups.POLL_INTERVAL_S``: waiting for
a lock longer than ``RESTORE_LOCK_WAIT_TIMEOUT_MS``, the restore is cancelled
(``pg_cancel_backend``; the transaction rolls back) and the job fails naming the sessions
that blocked it. Stop the application first (runbook §6.1 step 1), or end those sessions
on the Blocking sessions page. The job's own cancel stops the restore the same way.

**Verified by row counts.** The backup recorded the contract tables' rows in the dump's own
snapshot (``reconciliation.backups``). After the restore the job counts them again in one
snapshot; any difference fails the job loudly (the restore has committed by then: the job,
the audit entry and the notice all say that the counts do not match). A backup made before
the dashboard recorded counts is still restorable: the job first counts the rows in the
archive itself (``pg_restore --data-only`` to stdout), and says that this is where the
expected counts came from.

**Recorded.** Once pg_restore has run, whatever its outcome, one transaction in ``default``
writes the stakeholder notices (``notify_stakeholders``: the ops channel and the emails)
and the audit entry (``database.restored`` or ``database.restore_failed``, with the backup,
the reason, who asked and approved, and the counts before, expected and after). A request
refused before pg_restore ran changes nothing and tells only the job page and the trail.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from django.core.exceptions import ValidationError
from django.db import connections, transaction
from django.utils.translation import gettext as _

from audit.services import SYSTEM_WORKER, audit_record
from billing_ops import access
from billing_ops.environments import Environment, environment_connect
from billing_ops.formats import grouped
from billing_ops.models import Job, JobStatus
from billing_ops.notifications import notify_stakeholders
from billing_ops.services import Actor, JobCancelled, JobContext, JobRefused, job_request
from reconciliation import backups
from reconciliation.backups import Backup, BackupError
from reconciliation.services import file_digest

RESTORE_KIND = "database_restore"
BACKUP_KIND = "database_backup"
REASON_MAX_CHARS = 500
# How long the restore may wait for a lock another session holds before it is cancelled.
RESTORE_LOCK_WAIT_TIMEOUT_MS = 30_000
# Counting before and after the restore waits no longer for a lock than the restore does.
COUNT_LOCK_TIMEOUT_MS = RESTORE_LOCK_WAIT_TIMEOUT_MS
# After a cancel, how long pg_restore gets to notice and exit before it is killed.
STOP_GRACE_S = 30
SESSIONS_LISTED = 20
QUERY_TEXT_CHARS = 200
STEPS = 5

# The restore's backend, found by the application_name the job gives pg_restore.
_WATCH_SQL = """
SELECT a.pid, a.wait_event_type, a.wait_event, pg_blocking_pids(a.pid)
  FROM pg_stat_activity a
 WHERE a.application_name = %s AND a.datname = current_database()
"""
_SESSIONS_SQL = """
SELECT a.pid, a.usename::text, a.application_name, a.client_addr::text, a.state,
       a.backend_start, a.xact_start, a.wait_event_type, left(a.query, %s)
  FROM pg_stat_activity a
 WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()
   AND a.backend_type = 'client backend' {only}
 ORDER BY a.backend_start, a.pid
"""
_SIGNAL_SQL = """
SELECT {signal}(a.pid) FROM pg_stat_activity a
 WHERE a.application_name = %s AND a.datname = current_database()
"""


class RestoreError(Exception):
    """pg_restore ran and failed (nothing was restored), or the restored rows do not match
    the backup's; the message says which."""


# --- The rule -------------------------------------------------------------------------------


def restore_refusal(env: Environment) -> str:
    """Why the environment may not be restored, or "" when it may (see the module docstring)."""
    if env.protected and not env.allow_restore:
        return _(
            "%(env)s is protected: a full restore is refused unless its configuration sets "
            "allow_restore = true."
        ) % {"env": env.label}
    return ""


# --- Choosing a backup ------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreCandidate:
    """A backup as the restore form and the approver see it."""

    backup: Backup
    manifest: dict[str, Any]

    @property
    def created_at(self) -> str:
        return str(self.manifest.get("created_at", ""))

    @property
    def taken_at(self) -> datetime | None:
        """When the backup was taken, for display in the user's time zone and language."""
        try:
            return datetime.fromisoformat(self.created_at)
        except ValueError:
            return None

    @property
    def row_counts(self) -> dict[str, int | None] | None:
        return self.backup.row_counts


def restore_candidate(env: Environment, name: str) -> RestoreCandidate:
    """The environment's backup called ``name``, if the dashboard verified it; BackupError
    otherwise (no such backup, not ours, or changed in size since it was verified)."""
    listed, manifest = backups.backup_get(env, name)
    if manifest is None or not listed.verified:
        raise BackupError(
            _(
                "%(name)s was not verified by the dashboard (no manifest for a file of this size): "
                "only a backup the dashboard made and verified can be restored."
            )
            % {"name": name}
        )
    return RestoreCandidate(backup=listed, manifest=manifest)


# --- Request --------------------------------------------------------------------------------


def restore_request(
    *, actor: Actor, env: Environment, backup_name: str, confirmation: str, reason: str
) -> Job:
    """An approver asks for a full restore of ``env`` from one of its verified backups; it
    waits for another approver. Refused (ValidationError) where restores are not allowed,
    without the environment's label typed exactly, without a reason, or for a backup the
    dashboard did not verify. One restore per environment at a time (JobConflict)."""
    access.require_approver(actor)
    refusal = restore_refusal(env)
    if refusal:
        raise ValidationError(refusal)
    if confirmation.strip() != env.label:
        raise ValidationError(
            _("Type the environment's name, %(name)s, to confirm a restore of it.") % {"name": env.label}
        )
    reason = " ".join(reason.split())
    if not reason:
        raise ValidationError(
            _("Give the reason for the restore; it goes to the ops channel and the audit trail.")
        )
    if len(reason) > REASON_MAX_CHARS:
        raise ValidationError(_("Keep the reason to %(n)s characters.") % {"n": REASON_MAX_CHARS})
    try:
        candidate = restore_candidate(env, backup_name)
    except BackupError as exc:
        raise ValidationError(str(exc)) from None
    manifest = candidate.manifest
    return job_request(
        actor=actor,
        kind=RESTORE_KIND,
        environment=env.key,
        params={
            "backup": candidate.backup.name,
            # The approval is for this exact file: the job refuses another sha256.
            "sha256": candidate.backup.sha256,
            "size_bytes": candidate.backup.size_bytes,
            "backup_created_at": candidate.created_at,
            "backup_job_id": manifest.get("job_id"),
            "row_counts": candidate.row_counts,
            "reason": reason,
            "confirmed_name": env.label,
        },
        claims=[f"{RESTORE_KIND}:{env.key}"],
        requester_check=access.require_approver,
    )


# --- The job --------------------------------------------------------------------------------


def restore_execute(ctx: JobContext) -> dict[str, Any]:
    """The ``database_restore`` job (see the module docstring)."""
    env = ctx.env
    assert env is not None
    params = ctx.params
    name = str(params["backup"])
    refusal = restore_refusal(env)
    if refusal:  # the configuration changed since the request
        raise JobRefused(refusal + " " + _("Nothing was changed."))

    ctx.progress(0, STEPS, _("Checking %(name)s against what was approved") % {"name": name})
    try:
        candidate = restore_candidate(env, name)
        path = backups.backup_path(env, name)
    except BackupError as exc:
        raise JobRefused(str(exc) + " " + _("Nothing was changed.")) from None
    sha256, size = file_digest(path)
    if sha256 != params["sha256"] or size != params["size_bytes"]:
        raise JobRefused(
            _(
                "%(name)s is not the file that was approved (sha256 %(now)s, %(size)s bytes; approved: "
                "sha256 %(then)s, %(then_size)s bytes). Nothing was changed."
            )
            % {
                "name": name,
                "now": sha256,
                "size": size,
                "then": params["sha256"],
                "then_size": params["size_bytes"],
            }
        )
    backup_job = (
        Job.objects.filter(kind=BACKUP_KIND, environment=env.key, status=JobStatus.RUNNING)
        .order_by("pk")
        .first()
    )
    if backup_job is not None:
        raise JobRefused(
            _(
                "Backup job #%(id)s of %(env)s is running: its pg_dump holds locks the restore would "
                "wait for. Nothing was changed; request the restore again once it has finished."
            )
            % {"id": backup_job.pk, "env": env.label}
        )

    server_version = backups.environment_server_version(env)
    tool = backups.pg_dump_choose(server_version, backups.pg_dump_candidates())
    pg_restore = Path(tool.path).with_name("pg_restore")
    if not os.access(pg_restore, os.X_OK):
        raise JobRefused(_("No pg_restore beside %(path)s.") % {"path": tool.path})
    pg_restore_version = backups.tool_version(str(pg_restore)) or "?"
    ctx.log(
        _("PostgreSQL %(server)s: using pg_restore %(version)s from %(source)s.")
        % {"server": server_version, "version": pg_restore_version, "source": tool.source}
    )

    expected = candidate.row_counts
    if expected is not None:
        counts_source = "manifest"
        ctx.log(
            _("Rows recorded in the backup's snapshot: %(c)s.") % {"c": backups.row_counts_text(expected)}
        )
    else:
        counts_source = "archive"
        ctx.progress(1, STEPS, _("Counting the rows in the archive (the backup recorded none)"))
        try:
            expected = backups.archive_row_counts(str(pg_restore), path, check=ctx.check_cancel)
        except BackupError as exc:
            raise JobRefused(str(exc) + " " + _("Nothing was changed.")) from None
        ctx.log(
            _("The backup recorded no row counts; the archive holds: %(c)s.")
            % {"c": backups.row_counts_text(expected)}
        )

    ctx.progress(2, STEPS, _("Counting the rows now"))
    connections[env.alias].close()  # the worker's own idle connection is nobody's business
    sessions = _sessions(env)
    if sessions:
        ctx.log(
            _(
                "%(n)s other session(s) are connected to the database; one holding a lock on a table "
                "being restored makes the restore wait (at most %(s)s s, then it is cancelled): %(list)s"
            )
            % {
                "n": len(sessions),
                "s": RESTORE_LOCK_WAIT_TIMEOUT_MS // 1000,
                "list": "; ".join(_session_text(s) for s in sessions[:SESSIONS_LISTED]),
            },
            level="warning",
        )
    try:
        before = backups.environment_row_counts(env, lock_timeout_ms=COUNT_LOCK_TIMEOUT_MS)
    except BackupError as exc:
        raise JobRefused(str(exc) + " " + _("Nothing was changed.")) from None
    ctx.log(_("Rows before the restore: %(c)s.") % {"c": backups.row_counts_text(before)})

    result: dict[str, Any] = {
        "backup": name,
        "sha256": sha256,
        "size_bytes": size,
        "backup_created_at": params.get("backup_created_at", ""),
        "reason": params["reason"],
        "pg_restore_version": pg_restore_version,
        "server_version": server_version,
        "sessions_before": sessions[:SESSIONS_LISTED],
        "sessions_before_total": len(sessions),
        "counts_source": counts_source,
        "counts_expected": expected,
        "counts_before": before,
    }
    ctx.progress(3, STEPS, _("pg_restore is restoring %(name)s") % {"name": name})
    started = time.monotonic()
    try:
        _pg_restore_run(ctx, env, str(pg_restore), path)
    except Exception as exc:  # stopped and rolled back (a cancel too): record it, then fail
        result["duration_ms"] = round((time.monotonic() - started) * 1000)
        error = (
            _("Cancelled on request while pg_restore ran; its transaction was rolled back.")
            if isinstance(exc, JobCancelled)
            else str(exc) or type(exc).__name__
        )
        _after_failure(ctx, env, result, error=error)
        raise
    result["duration_ms"] = round((time.monotonic() - started) * 1000)
    ctx.log(_("pg_restore committed in %(ms)s ms.") % {"ms": grouped(result["duration_ms"])})

    ctx.progress(4, STEPS, _("Counting the restored rows"))
    try:
        after: dict[str, int | None] | None = backups.environment_row_counts(
            env, lock_timeout_ms=COUNT_LOCK_TIMEOUT_MS
        )
        count_error = ""
    except BackupError as exc:
        after, count_error = None, str(exc)
    result["counts_after"] = after
    mismatches = counts_compare(expected, after) if after is not None else [count_error]
    result["mismatches"] = mismatches
    result["verified"] = not mismatches
    result["status"] = "verified" if not mismatches else "counts_mismatch"
    result["tables"] = counts_table(result)
    _record(ctx, env, result)
    if mismatches:
        ctx.keep_result(result)  # the job fails, and its page must still show the counts
        ctx.log(
            _("The restored rows do not match the backup: %(m)s") % {"m": "; ".join(mismatches)},
            level="error",
        )
        raise RestoreError(
            _(
                "The restore of %(name)s was committed, but the restored rows do not match the backup: "
                "%(m)s. Find out why before the environment is used (was the application writing?)."
            )
            % {"name": name, "m": "; ".join(mismatches)}
        )
    ctx.log(
        _("Rows after the restore: %(c)s: as in the backup.") % {"c": backups.row_counts_text(after or {})}
    )
    ctx.progress(STEPS, STEPS, _("Restored and verified"))
    return result


def counts_compare(expected: dict[str, int | None], after: dict[str, int | None]) -> list[str]:
    """Every table whose restored rows differ from the backup's. A table the backup did not
    have is not restored (nor dropped), so it is not compared."""
    mismatches = []
    for name, want in expected.items():
        if want is None:
            continue
        got = after.get(name)
        if got != want:
            mismatches.append(
                _("%(table)s has %(got)s rows, the backup %(want)s")
                % {
                    "table": name,
                    "got": _("no table") if got is None else grouped(got),
                    "want": grouped(want),
                }
            )
    return mismatches


def counts_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per contract table: before, expected (the backup's), after, and whether
    after is what a successful restore must give (the expected count; for a failed one,
    the count before)."""
    after = result.get("counts_after") or {}
    rows = []
    for table, expected in result["counts_expected"].items():
        before = result["counts_before"].get(table)
        want = before if result.get("status") == "rolled_back" or expected is None else expected
        rows.append(
            {
                "table": table,
                "before": before,
                "expected": expected,
                "after": after.get(table),
                "match": after.get(table) == want,
            }
        )
    return rows


def _after_failure(ctx: JobContext, env: Environment, result: dict[str, Any], *, error: str) -> None:
    """pg_restore failed: its transaction rolled back. Count again to show the rows are as
    they were, record and tell, keep the result on the job."""
    try:
        after: dict[str, int | None] | None = backups.environment_row_counts(
            env, lock_timeout_ms=COUNT_LOCK_TIMEOUT_MS
        )
    except (BackupError, psycopg.Error) as exc:  # the environment may be what failed
        after = None
        ctx.log(_("Could not count the rows again: %(e)s") % {"e": exc}, level="warning")
    result.update(
        {
            "status": "rolled_back",
            "verified": False,
            "error": error,
            "counts_after": after,
            "unchanged": after == result["counts_before"],
        }
    )
    result["tables"] = counts_table(result)
    if after is not None:
        ctx.log(
            _("Rows after the failed restore: %(c)s (%(same)s).")
            % {
                "c": backups.row_counts_text(after),
                "same": _("as before")
                if result["unchanged"]
                else _("not as before: someone else wrote meanwhile"),
            }
        )
    _record(ctx, env, result)
    ctx.keep_result(result)


# --- pg_restore and its watcher -----------------------------------------------------------------


def _application_name(env: Environment, job_id: int) -> str:
    return f"billing-ops restore env={env.key} job={job_id}"


def _pg_restore_run(ctx: JobContext, env: Environment, pg_restore: str, archive: Path) -> None:
    """Run pg_restore into the environment, watching its backend (see the module docstring).
    RestoreError when it fails; JobCancelled (after stopping it) on a cancel."""
    app_name = _application_name(env, ctx.job_id)
    with (
        backups.libpq_environ(env) as child_env,
        tempfile.TemporaryFile(mode="w+b") as stderr,
        environment_connect(env, autocommit=True) as watch,
    ):
        child_env["PGAPPNAME"] = app_name
        argv = [
            pg_restore,
            "--clean",
            "--if-exists",
            "--no-owner",
            "--single-transaction",
            "--exit-on-error",
            "--verbose",
            "--no-password",
            # A conninfo naming only the database: host, user and password come from the
            # environment (PG* variables and the passfile), never from the command line.
            f"--dbname=dbname={_conninfo_quote(child_env.get('PGDATABASE', env.dbname))}",
            str(archive),
        ]
        proc = subprocess.Popen(  # noqa: S603 - pg_restore by absolute path, no shell
            argv, env=child_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
        blocked: list[dict[str, Any]] = []
        waiting_since: float | None = None

        def lock_wait_exceeded() -> bool:
            """Cancel the restore once it has waited RESTORE_LOCK_WAIT_TIMEOUT_MS for a lock."""
            nonlocal waiting_since, blocked
            row = watch.execute(_WATCH_SQL, [app_name]).fetchone()
            if row is None or row[1] != "Lock":
                waiting_since = None
                return False
            waiting_since = waiting_since or time.monotonic()
            if (time.monotonic() - waiting_since) * 1000 < RESTORE_LOCK_WAIT_TIMEOUT_MS:
                return False
            blocked = _sessions(env, pids=list(row[3] or []), conn=watch)
            ctx.log(
                _("The restore waited %(s)s s for a lock; cancelling it. Blocked by: %(list)s")
                % {
                    "s": RESTORE_LOCK_WAIT_TIMEOUT_MS // 1000,
                    "list": "; ".join(_session_text(s) for s in blocked) or "?",
                },
                level="error",
            )
            _stop(proc, watch, app_name)
            return True

        try:
            backups.watch_process(proc, stderr, ctx, step=3, steps=STEPS, tick=lock_wait_exceeded)
        except BaseException as exc:  # a cancel, the time limit, anything: never leave it running
            _stop(proc, watch, app_name)
            if proc.returncode == 0:  # too late: it had committed
                ctx.log(_("pg_restore had already committed when it was to be stopped."), level="warning")
                return
            if isinstance(exc, JobCancelled):
                ctx.log(_("pg_restore stopped on request; its transaction was rolled back."), level="warning")
            raise
        if proc.returncode == 0:  # committed (a cancel for a lock wait may have come too late)
            return
        if blocked:
            raise RestoreError(
                _(
                    "The restore waited more than %(s)s s for a lock and was cancelled; its transaction was "
                    "rolled back, nothing was restored. Blocked by: %(list)s. Stop the application's "
                    "connections (runbook §6.1 step 1), then request the restore again."
                )
                % {
                    "s": RESTORE_LOCK_WAIT_TIMEOUT_MS // 1000,
                    "list": "; ".join(_session_text(s) for s in blocked) or "?",
                }
            )
        if proc.returncode != 0:
            raise RestoreError(
                _(
                    "pg_restore failed (exit %(code)s); its single transaction was rolled back, nothing was "
                    "restored. %(tail)s"
                )
                % {"code": proc.returncode, "tail": backups.stderr_tail(stderr)}
            )


def _conninfo_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _stop(proc: subprocess.Popen[bytes], watch: Any, app_name: str) -> None:
    """Cancel the restore's statement on the server (its transaction rolls back; a backend
    waiting for a lock would not notice its client going away), let pg_restore exit, and
    only then kill what is left."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(Exception):
        watch.execute(_SIGNAL_SQL.format(signal="pg_cancel_backend"), [app_name])
    try:
        proc.wait(timeout=STOP_GRACE_S)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(Exception):
        watch.execute(_SIGNAL_SQL.format(signal="pg_terminate_backend"), [app_name])
    proc.kill()
    proc.wait()


def _sessions(env: Environment, *, pids: list[int] | None = None, conn: Any = None) -> list[dict[str, Any]]:
    """Other client sessions on the environment's database (or just ``pids``), as plain
    values for the job's log and result."""
    query = _SESSIONS_SQL.format(only="AND a.pid = ANY(%s)" if pids is not None else "")
    args: list[Any] = [QUERY_TEXT_CHARS] + ([pids] if pids is not None else [])
    with contextlib.ExitStack() as stack:
        if conn is None:
            conn = stack.enter_context(environment_connect(env, autocommit=True))
        rows = conn.execute(query, args).fetchall()
    return [
        {
            "pid": pid,
            "user": user or "",
            "application_name": app or "",
            "client_addr": addr or "",
            "state": state or "",
            "backend_start": started.isoformat(timespec="seconds") if started else "",
            "xact_start": xact.isoformat(timespec="seconds") if xact else "",
            "waiting": wait == "Lock",
            "query": query_text or "",
        }
        for pid, user, app, addr, state, started, xact, wait, query_text in rows
    ]


def _session_text(session: dict[str, Any]) -> str:
    parts = [
        session["application_name"] or _("no application name"),
        session["user"],
        session["client_addr"],
        session["state"],
    ]
    if session["xact_start"]:
        parts.append(_("in a transaction since %(at)s") % {"at": session["xact_start"]})
    return _("pid %(pid)s (%(what)s)") % {"pid": session["pid"], "what": ", ".join(p for p in parts if p)}


# --- Record and tell ----------------------------------------------------------------------------


def _record(ctx: JobContext, env: Environment, result: dict[str, Any]) -> None:
    """The notices and the audit entry, in one transaction of ``default``: both exist
    exactly when the outcome is recorded (the audit entry last: it holds the chain's lock)."""
    job = Job.objects.select_related("requested_by", "approved_by").get(pk=ctx.job_id)
    requested_by = job.requested_by.get_username() if job.requested_by else "?"
    approved_by = job.approved_by.get_username() if job.approved_by else "?"
    subject, body, ops_text = restore_notice(
        env=env, result=result, job_id=job.pk, requested_by=requested_by, approved_by=approved_by
    )
    with transaction.atomic():
        notify_stakeholders(email_subject=subject, email_body=body, ops_text=ops_text, source=f"job:{job.pk}")
        audit_record(
            actor=SYSTEM_WORKER,
            action="database.restore_failed" if result["status"] == "rolled_back" else "database.restored",
            environment=env.key,
            object_type="job",
            object_id=job.pk,
            params={
                "backup": result["backup"],
                "sha256": result["sha256"],
                "size_bytes": result["size_bytes"],
                "backup_created_at": result["backup_created_at"],
                "reason": result["reason"],
                "requested_by": requested_by,
                "approved_by": approved_by,
            },
            outcome={
                "status": result["status"],
                "counts_source": result["counts_source"],
                "counts_expected": result["counts_expected"],
                "counts_before": result["counts_before"],
                "counts_after": result.get("counts_after"),
                "mismatches": result.get("mismatches", []),
                "error": result.get("error", "")[:2000],
                "duration_ms": result.get("duration_ms"),
            },
        )


def restore_notice(
    *, env: Environment, result: dict[str, Any], job_id: int, requested_by: str, approved_by: str
) -> tuple[str, str, str]:
    """(email subject, email body, ops line) for a restore's outcome; the ops line mirrors
    the runbook's ``🔴 Rollback executed for run <RUN_ID>. Reason: <reason>``."""
    name, reason, status = result["backup"], result["reason"], result["status"]
    values = {"env": env.label, "name": name, "reason": reason}
    if status == "verified":
        ops = _("🔴 Restore executed for %(env)s from backup %(name)s. Reason: %(reason)s") % values
        subject = _("Billing reconciliation: %(env)s restored from backup %(name)s") % values
        verdict = _("Verified: every contract table has the backup's row count.")
    elif status == "counts_mismatch":
        ops = (
            _(
                "🔴 Restore executed for %(env)s from backup %(name)s, but the row counts do NOT match the "
                "backup. Reason: %(reason)s"
            )
            % values
        )
        subject = (
            _("Billing reconciliation: %(env)s restored from backup %(name)s, row counts DO NOT match")
            % values
        )
        verdict = _("NOT verified: %(m)s.") % {"m": "; ".join(result.get("mismatches", []))}
    else:
        ops = (
            _("⚠️ Restore of %(env)s from backup %(name)s failed and was rolled back. Reason: %(reason)s")
            % values
        )
        subject = (
            _("Billing reconciliation: restore of %(env)s from backup %(name)s failed, nothing restored")
            % values
        )
        verdict = _("Failed; pg_restore's single transaction was rolled back: %(error)s") % {
            "error": result.get("error", "")
        }
    expected_label = _("backup") if result["counts_source"] == "manifest" else _("archive")
    lines = [
        _("Environment: %(env)s") % values,
        _("Backup: %(name)s (taken %(at)s, %(size)s bytes, sha256 %(sha)s)")
        % {
            "name": name,
            "at": result.get("backup_created_at") or "?",
            "size": grouped(result["size_bytes"]),
            "sha": result["sha256"],
        },
        _("Reason: %(reason)s") % values,
        _("Requested by %(who)s, approved by %(approver)s (job #%(id)s)")
        % {"who": requested_by, "approver": approved_by, "id": job_id},
        "",
        _("Rows per table: before / %(expected)s / after") % {"expected": expected_label},
    ]
    after = result.get("counts_after") or {}
    for table, want in result["counts_expected"].items():
        lines.append(
            f"  {table}: {_fmt(result['counts_before'].get(table))} / {_fmt(want)} / {_fmt(after.get(table))}"
        )
    lines += ["", verdict]
    return subject, "\n".join(lines), ops


def _fmt(n: int | None) -> str:
    return "—" if n is None else grouped(n)
