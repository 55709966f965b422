"""Verifying the audit hash chains as jobs: on request, on a schedule, with an alert when
one is broken (runbook §5.4, beyond it: every row, every hash we wrote).

One job kind, ``chain_verify`` (read-only, resumable: a lost worker's job starts over), for
both kinds of chain:

* an environment's ``public.audit_logs``: the job's environment is that environment;
* the dashboard's own trail (``audit_entry`` in ``default``): the job has no environment
  (``Job.environment`` ""), which the job core allows for this kind only
  (``JobKind.without_environment``). The trail belongs to no environment: attached to one,
  its verifications would be listed among that environment's jobs, and would lose their
  home the day that environment left the configuration.

The parameters say which (``{"chain": "environment"}`` or ``{"chain": "dashboard"}``) so
that a job's digest names the chain even without its environment column.

One verification per chain at a time: the job holds the claim ``chain-verify:env:<key>``
or ``chain-verify:dashboard`` until it settles, so a second request (a button pressed
twice, the schedule while a long verification still runs) is refused naming the first.

The verification streams the chain (``audit.selectors``, constant memory) and keeps a
compact result on the job: counts, what was recomputed and what was checked for linkage
only, each kind of damage, up to ``RESULT_DAMAGES`` damaged entries, the first broken
entry, the last verified head, duration and rows per second. Then the chain's alert
follows: damage opens (or keeps) one critical ``audit_chain_broken`` alert per chain,
notified once through the alert outbox; a later intact verification resolves it. A
verification that could not read the chain (unreachable, cancelled) changes no alert.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from django.db import connection, connections
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import ngettext

from audit.models import AuditEntry
from audit.selectors import (
    ChainPoint,
    ChainReport,
    DamageKind,
    dashboard_chain_verify,
    environment_chain_verify,
)
from billing_ops import access
from billing_ops.environments import Environment, all_environments
from billing_ops.formats import grouped
from billing_ops.job_kinds import CHAIN_VERIFY
from billing_ops.models import Job
from billing_ops.services import Actor, JobConflict, JobContext, job_request
from locks.models import AlertKind, AlertSeverity
from locks.services import AlertEvent, Finding, alerts_follow

logger = logging.getLogger(__name__)

CHAIN_VERIFY_KIND = CHAIN_VERIFY.name
ENVIRONMENT_CHAIN = "environment"
DASHBOARD_CHAIN = "dashboard"
# Damaged entries kept on the job (the kinds are all counted); the command lists them all.
RESULT_DAMAGES = 100
# ... and in the alert (its notification lists fewer), and in the job's log.
ALERT_DAMAGES = 20
LOGGED_DAMAGES = 20


def chain_claim_key(env: Environment | None) -> str:
    return f"chain-verify:env:{env.key}" if env is not None else "chain-verify:dashboard"


def chain_label(env: Environment | None) -> str:
    """How pages, logs and alerts name a chain."""
    if env is None:
        return _("the dashboard's audit trail")
    return _("%(env)s audit_logs") % {"env": env.label}


# --- Requests --------------------------------------------------------------------------------


def chain_verify_request(*, actor: Actor, env: Environment | None, requester_check: Any = None) -> Job:
    """Queue a verification of an environment's chain (``env``) or of the dashboard's own
    trail (``env`` None). Operators and approvers may; raises JobConflict naming the
    verification of the same chain that is still active."""
    return job_request(
        actor=actor,
        kind=CHAIN_VERIFY_KIND,
        environment=env.key if env is not None else "",
        params={"chain": ENVIRONMENT_CHAIN if env is not None else DASHBOARD_CHAIN},
        claims=[chain_claim_key(env)],
        requester_check=requester_check or access.require_operator_or_approver,
    )


def _is_scheduler(actor: Actor) -> None:
    from locks.schedule import SCHEDULER_USERNAME

    if getattr(actor, "username", None) != SCHEDULER_USERNAME:
        raise PermissionError("only the scheduler requests scheduled verifications")


def chain_verify_scheduled_run() -> list[str]:
    """One scheduled round (beat, every ``CHAIN_VERIFY_INTERVAL_S``): request a verification
    of every environment's chain and of the dashboard's trail, as the scheduler. A chain
    whose previous verification is still active is skipped (its claim is held)."""
    from locks.schedule import scheduler_user

    requester = scheduler_user()
    outcomes: list[str] = []
    targets: list[Environment | None] = [*all_environments(), None]
    for env in targets:
        name = env.key if env is not None else DASHBOARD_CHAIN
        try:
            job = chain_verify_request(actor=requester, env=env, requester_check=_is_scheduler)
        except JobConflict as exc:
            outcomes.append(f"{name}: skipped, job #{exc.holder.pk} is still verifying it")
            continue
        outcomes.append(f"{name}: job #{job.pk} queued")
    for line in outcomes:
        logger.info("scheduled chain verification: %s", line)
    return outcomes


# --- The job -----------------------------------------------------------------------------------


def chain_verify_execute(ctx: JobContext) -> dict[str, Any]:
    """The ``chain_verify`` job: verify one chain, keep the result, let its alert follow."""
    chain = ctx.params.get("chain")
    if chain != (ENVIRONMENT_CHAIN if ctx.env is not None else DASHBOARD_CHAIN):
        raise ValueError(f"chain_verify: chain {chain!r} does not match the job's environment")
    env = ctx.env
    total = chain_rows_estimate(env)
    label = chain_label(env)
    ctx.progress(0, total, _("Reading %(chain)s") % {"chain": label})
    observed_at = timezone.now()
    started = time.monotonic()
    if env is None:
        # The trail is read in a transaction of `default`: progress written from inside it
        # would stay invisible until the end and hold the job's row against its heartbeat.
        # Only the cancel check (a read) runs meanwhile.
        report = dashboard_chain_verify(progress=lambda rows: ctx.check_cancel())
    else:

        def progress(rows: int) -> None:
            ctx.check_cancel()
            ctx.progress(rows, max(total or 0, rows) or None, _("%(n)s entries read") % {"n": grouped(rows)})

        report = environment_chain_verify(env=env, progress=progress)
    duration_s = time.monotonic() - started
    result = chain_result(report, chain=chain, duration_s=duration_s)

    events = alerts_follow([chain_finding(env, report, job_id=ctx.job_id, observed_at=observed_at)])
    result["alert"] = _alert_outcome(events)

    summary = chain_summary(result)
    for damage in result["damages"][:LOGGED_DAMAGES]:
        ctx.log(
            _("entry #%(id)s: %(kind)s - %(detail)s")
            % {"id": damage["entry_id"], "kind": damage["kind"], "detail": damage["detail"]},
            level="error",
        )
    ctx.log(summary, level="info" if report.intact else "error")
    ctx.progress(report.entries, report.entries, summary)
    return result


def chain_rows_estimate(env: Environment | None) -> int | None:
    """The planner's row count of the chain's table (cheap; None before its first ANALYZE):
    the progress bar's total, never a result."""
    db = connection if env is None else connections[env.alias]
    table = AuditEntry._meta.db_table if env is None else "public.audit_logs"
    with db.cursor() as cursor:
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", [table])
        row = cursor.fetchone()
    return int(row[0]) if row and row[0] and row[0] > 0 else None


def _point(point: ChainPoint | None) -> dict[str, Any] | None:
    return None if point is None else {"entry_id": point.entry_id, "hash": point.hash}


def chain_result(report: ChainReport, *, chain: str, duration_s: float) -> dict[str, Any]:
    """What a verification keeps on its job (JSON; the page and the history read it)."""
    return {
        "chain": chain,
        "intact": report.intact,
        "entries": report.entries,
        "recomputed": report.recomputed,
        "linkage_only": report.linkage_only,
        "damaged_entries": report.damaged_entries,
        # A list, not an object: jsonb would not keep the kinds in DamageKind's order.
        "damage_kinds": [
            {"kind": str(kind), "count": report.kind_counts[kind]}
            for kind in DamageKind
            if report.kind_counts.get(kind)
        ],
        "damages": [
            {"entry_id": d.entry_id, "kind": str(d.kind), "detail": d.detail}
            for d in report.damages[:RESULT_DAMAGES]
        ],
        "damages_found": sum(report.kind_counts.values()),
        "first_broken": _point(report.first_broken),
        "verified_head": _point(report.verified_head),
        "head": _point(report.head),
        "duration_s": round(duration_s, 3),
        "rows_per_s": round(report.entries / duration_s) if duration_s > 0 else None,
    }


def chain_summary(result: dict[str, Any]) -> str:
    checked = _("%(n)s entries") % {"n": f"{result['entries']:,}"}
    if result["linkage_only"]:
        checked += " " + _("(%(r)s recomputed, %(l)s of other writers checked for linkage only)") % {
            "r": f"{result['recomputed']:,}",
            "l": f"{result['linkage_only']:,}",
        }
    if result["intact"]:
        head = result["head"]
        return _("Intact: %(checked)s; head #%(id)s.") % {
            "checked": checked,
            "id": head["entry_id"] if head else "-",
        }
    first = result["first_broken"]
    return _("DAMAGED: %(n)s damaged of %(checked)s; first broken entry #%(id)s.") % {
        "n": f"{result['damaged_entries']:,}",
        "checked": checked,
        "id": first["entry_id"] if first else "-",
    }


# --- The alert ------------------------------------------------------------------------------


def chain_finding(
    env: Environment | None, report: ChainReport, *, job_id: int, observed_at: datetime
) -> Finding:
    """The chain's alert as this verification found it: present (critical) when damaged."""
    kind = AlertKind.AUDIT_CHAIN_BROKEN
    if report.intact:
        return Finding(env, kind, present=False, observed_at=observed_at)
    n = report.damaged_entries
    first = report.first_broken
    values = {"where": env.label if env is not None else _("Dashboard"), "n": grouped(n)}
    if env is not None:
        summary = (
            ngettext(
                "%(where)s: audit_logs hash chain broken, %(n)s damaged entry",
                "%(where)s: audit_logs hash chain broken, %(n)s damaged entries",
                n,
            )
            % values
        )
    else:
        summary = (
            ngettext(
                "%(where)s: audit trail hash chain broken, %(n)s damaged entry",
                "%(where)s: audit trail hash chain broken, %(n)s damaged entries",
                n,
            )
            % values
        )
    if first:
        summary += _("; first broken entry #%(id)s") % {"id": first.entry_id}
    return Finding(
        env,
        kind,
        present=True,
        observed_at=observed_at,
        severity=AlertSeverity.CRITICAL,
        summary=summary,
        details={
            "job_id": job_id,
            "observed_at": observed_at.isoformat(),
            "severity_reasons": [
                f"{report.kind_counts[kind]:,} {kind}" for kind in DamageKind if report.kind_counts.get(kind)
            ],
            "damaged_entries": n,
            "damages": [
                {"entry_id": d.entry_id, "kind": str(d.kind), "detail": d.detail}
                for d in report.damages[:ALERT_DAMAGES]
            ],
            "first_broken": _point(first),
            "verified_head": _point(report.verified_head),
        },
    )


def _alert_outcome(events: list[AlertEvent]) -> dict[str, Any] | None:
    if not events:
        return None
    event = events[0]
    return {"id": event.alert.pk, "event": event.event}
