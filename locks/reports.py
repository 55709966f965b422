"""The seed report as an export: the analyst's lock analysis, regenerated from live data.

``lock_report(envs)`` asks every environment the seed analysis's questions (the figures
of ``environments_status`` and the runs of the seed query, ``stuck_runs``) and returns
one stable structure; monitoring scripts parse its JSON, so the key names, their order
and the nesting below are a contract::

    {"environments": [{"key", "label", "host", "reachable", "error",
                       "total_runs", "completed_runs", "completed_with_locks",
                       "total_locks", "locks_without_billing",
                       "stuck_runs": [{"billing_run_id", "billing_number", "status",
                                       "process_stage", "create_date", "modify_date",
                                       "lock_count", "locked_entity_types": [...]}]}]}

Dates are ISO 8601 with the environment's offset, counts are integers, ``error`` is null
for a reachable environment. An environment that cannot be queried (connection refused,
timeout, or the run query failing) is reported with ``reachable: false``, its error, null
figures and no runs; it never costs the other environments their part of the report.
The figures and the run list are two reads, moments apart: on a live platform they can
differ by what changed in between, and the markdown says so when they do.

Three renderings of the same structure:

- JSON: exactly the structure, indented, keys in the order above.
- CSV (for a spreadsheet): one row per stuck run. Every environment that has no stuck run
  (clean or unreachable) still gets one row with the run columns empty, so an environment
  never silently drops out and an empty export cannot be mistaken for "all clean"; a
  trailing ``error`` column says why an environment has no figures. Count stuck runs as
  the rows with a ``billing_run_id``. Text cells that a spreadsheet would run as a
  formula (leading ``= + - @``, tab or CR) are prefixed with ``'``: billing numbers and
  entity types come from the billing platform, not from us.
- Markdown (its headings in the reader's language; the machine-readable JSON and CSV keys
  stay English): the seed report's sections (summary table, detailed findings with each
  environment's stuck runs, the query used, observations, recommendations), written from
  the live figures. Observations about ``make_billing_run_real`` and the billing_id index
  need figures that the JSON contract has no place for; ``lock_report`` returns a
  ``LockReport`` (a plain dict to ``json.dumps``) that carries them alongside, and a report
  loaded back from JSON renders without those two observations.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from billing_ops.environments import Environment
from billing_ops.exports import csv_cell
from billing_ops.selectors import describe_error, run_per_environment
from locks.selectors import (
    INITIAL_PROCESS_STAGE,
    STUCK_RUNS_SQL,
    EnvironmentStatus,
    LockFigures,
    environments_status,
    stuck_runs,
)

REPORT_TITLE = gettext_lazy("Billing Run Lock Analysis - All Environments")
# The stuck-runs table per environment in the markdown; the JSON and CSV list every run.
MARKDOWN_RUNS_PER_ENVIRONMENT = 50
# The seed query aggregates entity types with this separator (STRING_AGG in STUCK_RUNS_SQL).
# The platform's entity types are kebab-case names without commas, so splitting is exact.
ENTITY_TYPES_SEPARATOR = ", "
# Beyond connect + statement timeout, how long the run query of one environment may take.
STUCK_RUNS_TIMEOUT_MARGIN_S = 1
MS_PER_S = 1000

FIGURE_KEYS = ("total_runs", "completed_runs", "completed_with_locks", "total_locks", "locks_without_billing")
ENVIRONMENT_KEYS = ("key", "label", "host", "reachable", "error", *FIGURE_KEYS, "stuck_runs")
RUN_KEYS = (
    "billing_run_id",
    "billing_number",
    "status",
    "process_stage",
    "create_date",
    "modify_date",
    "lock_count",
    "locked_entity_types",
)
CSV_COLUMNS = ("environment", "label", "host", *RUN_KEYS, "error")
# Characters that would end a markdown table cell or start markup inside one.
MARKDOWN_SPECIAL = "\\`*[]<>|"


class LockReport(dict[str, Any]):
    """The report's stable structure (serialise it as it is), plus ``figures``: each
    reachable environment's LockFigures by key, for the markdown's observations."""

    figures: dict[str, LockFigures]

    def __init__(self, environments: list[dict[str, Any]], figures: dict[str, LockFigures]) -> None:
        super().__init__(environments=environments)
        self.figures = figures


def lock_report(envs: list[Environment]) -> LockReport:
    """Every environment's figures and stuck runs; concurrent, each bounded by its timeouts."""
    statuses = environments_status(envs)
    reachable = [status.env for status in statuses if status.figures is not None]
    timeout_s = (
        settings.CONNECT_TIMEOUT_S + settings.STATEMENT_TIMEOUT_MS / MS_PER_S + STUCK_RUNS_TIMEOUT_MARGIN_S
    )
    runs_by_key = run_per_environment(stuck_runs, reachable, timeout_s=timeout_s)
    environments: list[dict[str, Any]] = []
    figures: dict[str, LockFigures] = {}
    for status in statuses:
        runs = runs_by_key.get(status.env.key)
        if status.figures is None:
            environments.append(_unreachable_entry(status.env, status.error))
        elif isinstance(runs, BaseException):
            environments.append(_unreachable_entry(status.env, describe_error(runs)))
        else:
            environments.append(_reachable_entry(status, runs or []))
            figures[status.env.key] = status.figures
    return LockReport(environments, figures)


def _environment_head(env: Environment) -> dict[str, Any]:
    return {"key": env.key, "label": env.label, "host": env.host}


def _unreachable_entry(env: Environment, error: str) -> dict[str, Any]:
    return {
        **_environment_head(env),
        "reachable": False,
        "error": error or "unreachable",
        **dict.fromkeys(FIGURE_KEYS),
        "stuck_runs": [],
    }


def _reachable_entry(status: EnvironmentStatus, runs: list[dict[str, Any]]) -> dict[str, Any]:
    figures = status.figures
    assert figures is not None
    return {
        **_environment_head(status.env),
        "reachable": True,
        "error": None,
        **{key: int(getattr(figures, key)) for key in FIGURE_KEYS},
        "stuck_runs": [_run_entry(run) for run in runs],
    }


def _run_entry(run: dict[str, Any]) -> dict[str, Any]:
    entity_types = run["locked_entity_types"]
    return {
        "billing_run_id": int(run["billing_run_id"]),
        "billing_number": run["billing_number"],
        "status": run["status"],
        "process_stage": run["process_stage"],
        "create_date": _iso(run["create_date"]),
        "modify_date": _iso(run["modify_date"]),
        "lock_count": int(run["lock_count"]),
        "locked_entity_types": entity_types.split(ENTITY_TYPES_SEPARATOR) if entity_types else [],
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# --- JSON -------------------------------------------------------------------------------------


def render_json(report: dict[str, Any]) -> str:
    """The stable structure, keys in their documented order whatever the dict's order."""
    stable = {
        "environments": [
            {
                **{key: env[key] for key in ENVIRONMENT_KEYS if key != "stuck_runs"},
                "stuck_runs": [{key: run[key] for key in RUN_KEYS} for run in env["stuck_runs"]],
            }
            for env in report["environments"]
        ]
    }
    return json.dumps(stable, indent=2) + "\n"


# --- CSV --------------------------------------------------------------------------------------


def render_csv(report: dict[str, Any]) -> str:
    """One row per stuck run, and one row for each environment without any (see above)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for env in report["environments"]:
        head = [env["key"], env["label"], env["host"]]
        if not env["stuck_runs"]:
            writer.writerow(_csv_cells([*head, *[None] * len(RUN_KEYS), env["error"]]))
        for run in env["stuck_runs"]:
            cells = [run[key] for key in RUN_KEYS]
            cells[RUN_KEYS.index("locked_entity_types")] = ENTITY_TYPES_SEPARATOR.join(
                run["locked_entity_types"]
            )
            writer.writerow(_csv_cells([*head, *cells, None]))
    return buffer.getvalue()


def _csv_cells(values: Iterable[Any]) -> list[str]:
    return [csv_cell(value) for value in values]


# --- Markdown ---------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any], *, generated_at: datetime) -> str:
    """The seed report's structure, written from the live figures."""
    if timezone.is_naive(generated_at):
        raise ValueError("generated_at must be an aware datetime")
    envs: list[dict[str, Any]] = report["environments"]
    figures: dict[str, LockFigures] = getattr(report, "figures", {})
    sections = [
        _md_header(envs, generated_at),
        _md_executive_summary(envs),
        _md_results(envs),
        _md_query(),
        _md_schema(),
        _md_observations(envs, figures),
        _md_recommendations(envs, figures),
        _md_conclusion(envs, generated_at),
    ]
    return "\n\n".join(sections) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(md_escape(cell) for cell in cells) + " |"


def md_escape(value: Any) -> str:
    """Text safe inside a markdown table cell or a line: no cell breaks, no markup."""
    text = "" if value is None else str(value)
    text = " ".join(text.splitlines())
    return "".join(f"\\{char}" if char in MARKDOWN_SPECIAL else char for char in text)


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _plural(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count:,} {singular if count == 1 else (plural or singular + 's')}"


def _holds(count: int) -> str:
    return "holds" if count == 1 else "hold"


def _labels(envs: Iterable[dict[str, Any]]) -> str:
    return ", ".join(md_escape(env["label"]) for env in envs)


def _stuck_locks(env: dict[str, Any]) -> int:
    return sum(run["lock_count"] for run in env["stuck_runs"])


def _when(value: str | None) -> str:
    if not value:
        return "-"
    return datetime.fromisoformat(value).isoformat(sep=" ", timespec="seconds")


def _md_header(envs: list[dict[str, Any]], generated_at: datetime) -> str:
    reachable = [env for env in envs if env["reachable"]]
    unreachable = [env for env in envs if not env["reachable"]]
    lines = [
        f"# {REPORT_TITLE}",
        "",
        "**" + _("Date:") + f"** {generated_at:%Y-%m-%d %H:%M %Z}  ",
        "**"
        + _("Analysis:")
        + "** "
        + _("Find all billing runs with status COMPLETED that still have locked objects")
        + "  ",
        "**"
        + _("Environments Analyzed:")
        + "** "
        + (_labels(reachable) or _("none"))
        + ("  " if unreachable else ""),
    ]
    if unreachable:
        lines.append("**" + _("Environments Unreachable:") + "** " + _labels(unreachable))
    return "\n".join(lines)


def _md_executive_summary(envs: list[dict[str, Any]]) -> str:
    holding = [env for env in envs if env["stuck_runs"]]
    unreachable = [env for env in envs if not env["reachable"]]
    if holding:
        runs = sum(len(env["stuck_runs"]) for env in holding)
        locks = sum(_stuck_locks(env) for env in holding)
        where = "; ".join(
            f"{md_escape(env['label'])}: {_plural(len(env['stuck_runs']), 'run')} with "
            f"{_plural(_stuck_locks(env), 'lock')}"
            for env in holding
        )
        result = (
            f"⚠️ **RESULT:** {_plural(runs, 'billing run')} with status COMPLETED still "
            f"{_holds(runs)} {_plural(locks, 'lock')}. {where}."
        )
    elif unreachable:
        result = (
            "✅ **RESULT:** No billing runs with status COMPLETED that have locked objects were found "
            "in the environments analyzed."
        )
    else:
        result = (
            "✅ **RESULT:** No billing runs with status COMPLETED that have locked objects were found "
            "in any environment."
        )
    lines = ["## " + _("Executive Summary"), "", result]
    if unreachable:
        lines += [
            "",
            f"⚠️ **NOT ANALYZED:** {_labels(unreachable)} could not be queried; "
            "this result does not cover them.",
        ]
    return "\n".join(lines)


def _md_results(envs: list[dict[str, Any]]) -> str:
    lines = [
        "## " + _("Database Analysis Results"),
        "",
        "### " + _("Environment Summary"),
        "",
        _md_row(
            [
                _("Environment"),
                _("Host"),
                _("Total Billing Runs"),
                _("COMPLETED Billing Runs"),
                _("COMPLETED with Locks"),
                _("Total Locks"),
            ]
        ),
        "|-------------|------|-------------------|----------------------|---------------------"
        "|-------------|",
    ]
    for env in envs:
        name = f"**{md_escape(env['label'])}**" + ("" if env["reachable"] else " (unreachable)")
        figures = " | ".join(
            _n(env[key]) for key in ("total_runs", "completed_runs", "completed_with_locks", "total_locks")
        )
        lines.append(f"| {name} | {md_escape(env['host'])} | {figures} |")
    lines += ["", "### " + _("Detailed Findings")]
    for env in envs:
        lines += ["", *_md_findings(env)]
    return "\n".join(lines)


def _md_findings(env: dict[str, Any]) -> list[str]:
    lines = [
        "#### "
        + _("%(env)s Environment (%(host)s)")
        % {"env": md_escape(env["label"]), "host": md_escape(env["host"])}
    ]
    if not env["reachable"]:
        return [
            *lines,
            f"- **Unreachable:** {md_escape(env['error'])}",
            "- **No figures:** the environment could not be read.",
        ]
    without = env["locks_without_billing"]
    lines += [
        f"- **Total billing runs:** {_n(env['total_runs'])}",
        f"- **COMPLETED billing runs:** {_n(env['completed_runs'])}",
        f"- **COMPLETED billing runs with locks:** {_n(env['completed_with_locks'])}",
        f"- **Total locks in system:** {_n(env['total_locks'])}",
        f"- **Locks with billing_id:** {_n(env['total_locks'] - without)}; "
        f"**with NULL billing_id:** {_n(without)}",
    ]
    if env["total_locks"] and without == env["total_locks"]:
        lines.append(
            "- **Note:** All existing locks are not associated with billing runs (billing_id is NULL). "
            "These are likely user locks or other system locks, not billing run locks."
        )
    runs = env["stuck_runs"]
    if not runs:
        return [*lines, "", "No COMPLETED billing run holds locks."]
    lines += [
        "",
        _md_row(
            [
                _("Run ID"),
                _("Billing Number"),
                _("Status"),
                _("Process Stage"),
                _("Created"),
                _("Modified"),
                _("Locks"),
                _("Locked Entity Types"),
            ]
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs[:MARKDOWN_RUNS_PER_ENVIRONMENT]:
        cells = [
            str(run["billing_run_id"]),
            md_escape(run["billing_number"]),
            md_escape(run["status"]),
            md_escape(run["process_stage"]),
            _when(run["create_date"]),
            _when(run["modify_date"]),
            _n(run["lock_count"]),
            md_escape(ENTITY_TYPES_SEPARATOR.join(run["locked_entity_types"])),
        ]
        lines.append(f"| {' | '.join(cells)} |")
    left_out = runs[MARKDOWN_RUNS_PER_ENVIRONMENT:]
    if left_out:
        lines += [
            "",
            f"*… and {_plural(len(left_out), 'more run')} holding "
            f"{_plural(sum(run['lock_count'] for run in left_out), 'lock')}, not shown here "
            "(the JSON and CSV exports list every run).*",
        ]
    return lines


def _md_query() -> str:
    return "\n".join(["## " + _("Query Used"), "", "```sql", STUCK_RUNS_SQL.strip(), "```"])


def _md_schema() -> str:
    return "\n".join(
        [
            "## " + _("Database Schema Information"),
            "",
            "- **Billing runs table:** `billing.billings`",
            "- **Locks table:** `lock.locks`",
            "- **Status column type:** `billing.billing_status` (enum/user-defined type)",
            "- **Lock association:** `lock.locks.billing_id` → `billing.billings.id`",
        ]
    )


def _md_numbered(title: str, items: list[str]) -> str:
    if not items:
        items = ["Nothing to report."]
    return "\n".join([title, "", *[f"{number}. {item}" for number, item in enumerate(items, start=1)]])


def _sub(lines: Iterable[str]) -> str:
    return "".join(f"\n   - {line}" for line in lines)


def _observation_per_env(
    envs: list[dict[str, Any]], describe: Callable[[dict[str, Any]], str | None]
) -> list[str]:
    lines = []
    for env in envs:
        text = describe(env)
        if text:
            lines.append(f"{md_escape(env['label'])}: {text}")
    return lines


def _md_observations(envs: list[dict[str, Any]], figures: dict[str, LockFigures]) -> str:
    reachable = [env for env in envs if env["reachable"]]
    unreachable = [env for env in envs if not env["reachable"]]
    items: list[str] = []
    if unreachable:
        items.append(
            "**Unreachable Environments:** their figures are missing from this report."
            + _sub(
                f"{md_escape(env['label'])} ({md_escape(env['host'])}): {md_escape(env['error'])}"
                for env in unreachable
            )
        )
    empty = [env for env in reachable if env["total_runs"] == 0]
    if empty:
        items.append(
            f"**Empty Billing Runs Tables:** {_labels(empty)} "
            f"{'shows' if len(empty) == 1 else 'show'} 0 billing runs, which is unusual. "
            "This could indicate:"
            + _sub(["Fresh/clean databases", "Data was purged", "Different database instances than expected"])
        )
    holding = _observation_per_env(reachable, _holding_observation)
    if holding:
        items.append("**COMPLETED Runs Still Holding Locks:**" + _sub(holding))
    drift = _observation_per_env(reachable, _drift_observation)
    if drift:
        items.append("**Data Changed During the Analysis:**" + _sub(drift))
    without = _observation_per_env(reachable, _without_billing_observation)
    if without:
        items.append("**Locks Without a Billing Run:**" + _sub(without))
    if figures:
        known = [env for env in reachable if env["key"] in figures]
        items.append(
            "**Lock Release Procedure (`billing_run.make_billing_run_real`):**"
            + _sub(_observation_per_env(known, lambda env: _procedure_observation(figures[env["key"]])))
        )
        items.append(
            "**Index on `lock.locks(billing_id)`:**"
            + _sub(_observation_per_env(known, lambda env: _index_observation(env, figures[env["key"]])))
        )
        warnings = _observation_per_env(known, lambda env: _warning_observation(figures[env["key"]]))
        if warnings:
            items.append("**Other Warning Signs:**" + _sub(warnings))
    return _md_numbered("## " + _("Observations"), items)


def _holding_observation(env: dict[str, Any]) -> str | None:
    runs = env["stuck_runs"]
    if not runs:
        return None
    worst = max(runs, key=lambda run: run["lock_count"])
    text = (
        f"{_plural(len(runs), 'run')} {_holds(len(runs))} "
        f"{_plural(_stuck_locks(env), 'lock')}; the most: {md_escape(worst['billing_number'])} "
        f"(run {worst['billing_run_id']}) with {_plural(worst['lock_count'], 'lock')}"
    )
    unreal = sum(1 for run in runs if run["process_stage"] == INITIAL_PROCESS_STAGE)
    if unreal:
        text += (
            f"; {_plural(unreal, 'run')} still in process stage {INITIAL_PROCESS_STAGE}: "
            f"make_billing_run_real never finished for {'it' if unreal == 1 else 'them'}"
        )
    return text


def _drift_observation(env: dict[str, Any]) -> str | None:
    if env["completed_with_locks"] == len(env["stuck_runs"]):
        return None
    return (
        f"the summary counted {_plural(env['completed_with_locks'], 'COMPLETED run')} with locks, "
        f"the query moments later listed {len(env['stuck_runs']):,}"
    )


def _without_billing_observation(env: dict[str, Any]) -> str | None:
    without, total = env["locks_without_billing"], env["total_locks"]
    if not without:
        return None
    if without == total:
        share = f"{_plural(without, 'lock')}, all with NULL billing_id"
    else:
        share = f"{without:,} of {_plural(total, 'lock')} with NULL billing_id"
    return f"{share}: user or other system locks, not billing run locks"


def _procedure_observation(figures: LockFigures) -> str:
    if not figures.procedure.exists:
        return "missing: nothing releases a run's locks when accounting finishes"
    if not figures.procedure.deletes_locks:
        return "exists, but its body has no DELETE FROM lock.locks: every finished run keeps its locks"
    return "exists and deletes the run's locks"


def _index_observation(env: dict[str, Any], figures: LockFigures) -> str:
    if figures.shape.billing_id_indexed:
        return "present"
    return f"missing: each stuck-lock query reads all {_plural(env['total_locks'], 'lock')}"


def _warning_observation(figures: LockFigures) -> str | None:
    warnings = []
    if figures.stale_runs:
        warnings.append(
            f"{_plural(figures.stale_runs, 'IN_PROGRESS_ACCOUNTING run')} unchanged for over "
            f"{settings.STALE_RUN_AFTER_MIN} min (their thread likely died)"
        )
    if figures.error_path_runs_with_locks:
        warnings.append(
            f"{_plural(figures.error_path_runs_with_locks, 'run')} on the error path (GENERATED or failed) "
            "still holding locks"
        )
    return "; ".join(warnings) or None


def _md_recommendations(envs: list[dict[str, Any]], figures: dict[str, LockFigures]) -> str:
    holding = [env for env in envs if env["stuck_runs"]]
    unreachable = [env for env in envs if not env["reachable"]]
    empty = [env for env in envs if env["reachable"] and env["total_runs"] == 0]
    leaking = [
        env for env in envs if env["key"] in figures and not figures[env["key"]].procedure.deletes_locks
    ]
    parts = ["## " + _("Recommendations")]
    number = 0

    def add(title: str, lines: list[str]) -> None:
        nonlocal number
        number += 1
        parts.extend(["", f"### {number}. {title}", *[f"- {line}" for line in lines]])

    if holding:
        runs = sum(len(env["stuck_runs"]) for env in holding)
        add(
            _("Release the Stuck Locks"),
            [
                f"Release the locks of the {_plural(runs, 'COMPLETED run')} listed above "
                f"({_labels(holding)}), after confirming that each run has really finished",
            ],
        )
    if leaking:
        add(
            _("Fix the Lock Release"),
            [
                f"In {_labels(leaking)}: `billing_run.make_billing_run_real` must run "
                "`DELETE FROM lock.locks WHERE billing_id = :id` (check its body with `pg_get_functiondef`)",
                "Release the run's locks on the error path of the accounting service too",
            ],
        )
    if unreachable:
        add(
            _("Restore Access"),
            [f"Check the connection to {_labels(unreachable)} and run this report again"],
        )
    if empty:
        add(
            _("Verify Database Instances"),
            [
                f"Confirm that {_labels(empty)} point to the expected database instances",
                "Check if there are multiple database instances or schemas",
            ],
        )
    add(
        _("Monitor for Future Issues"),
        [
            "Alert on COMPLETED billing runs with locks (`billing_ops_stuck_locks > 0` on /metrics)",
            "Regular cleanup of orphaned locks",
            "Verify unlock logic is working correctly when billing runs complete",
        ],
    )
    return "\n".join(parts)


def _md_conclusion(envs: list[dict[str, Any]], generated_at: datetime) -> str:
    holding = [env for env in envs if env["stuck_runs"]]
    unreachable = [env for env in envs if not env["reachable"]]
    if holding:
        runs = sum(len(env["stuck_runs"]) for env in holding)
        locks = sum(_stuck_locks(env) for env in holding)
        status = (
            f"Action needed: {_plural(runs, 'COMPLETED billing run')} still {_holds(runs)} "
            f"{_plural(locks, 'lock')}."
        )
    elif unreachable:
        status = "No active issue found in the environments analyzed; the unreachable ones are not covered."
    else:
        status = "No active issue found. No COMPLETED billing run holds locks in any environment."
    return "\n".join(
        [
            "## " + _("Conclusion"),
            "",
            "**" + _("Status:") + f"** {status}",
            "",
            "---",
            "",
            "*"
            + _("Generated by Billing Ops on %(at)s") % {"at": f"{generated_at:%Y-%m-%d %H:%M %Z}"}
            + "*  ",
            "*" + _("Environments: %(labels)s") % {"labels": _labels(envs)} + "*",
        ]
    )
