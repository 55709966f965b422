"""The stuck-lock monitor's figures for Prometheus: alert on them instead of reading pages.

``render_metrics(statuses)`` turns what ``environments_status`` measured into the text
exposition format. The figures are read at scrape time, so a custom collector yields them
from the statuses it is given, and each call builds a ``CollectorRegistry`` of its own:
nothing is registered in prometheus_client's global registry, so no state survives a
scrape and two scrapes (or two tests) can never collide over a metric name.

Every series carries the labels ``environment`` (the key) and ``label``. An unreachable
environment exports only ``billing_ops_environment_up 0``: a stale 0 for its stuck locks
would read as "clean". ``billing_ops_oldest_stuck_lock_age_seconds`` is absent for an
environment without stuck locks, so an alert on it never fires on "no data".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from locks.selectors import EnvironmentStatus, LockFigures

METRIC_PREFIX = "billing_ops_"
LABEL_NAMES = ("environment", "label")
# The classic text format (0.0.4): every Prometheus version and scraper reads it, and our
# names need none of the 1.0.0 format's UTF-8 quoting, so the body is the same either way.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MS_PER_S = 1000


@dataclass(frozen=True)
class GaugeSpec:
    name: str
    documentation: str
    value: Callable[[LockFigures, datetime], float | None]  # None: no sample for that environment


FIGURE_GAUGES = (
    GaugeSpec("billing_runs", "Billing runs in billing.billings.", lambda f, now: f.total_runs),
    GaugeSpec("completed_runs", "Billing runs with status COMPLETED.", lambda f, now: f.completed_runs),
    GaugeSpec(
        "completed_runs_with_locks",
        "COMPLETED billing runs that still hold locks (the seed report's question).",
        lambda f, now: f.completed_with_locks,
    ),
    GaugeSpec("locks", "Rows in lock.locks.", lambda f, now: f.total_locks),
    GaugeSpec(
        "locks_without_billing",
        "Locks with NULL billing_id: user or other system locks, not billing run locks.",
        lambda f, now: f.locks_without_billing,
    ),
    GaugeSpec("stuck_locks", "Locks held by COMPLETED billing runs.", lambda f, now: f.stuck_locks),
    GaugeSpec(
        "stale_runs",
        "IN_PROGRESS_ACCOUNTING runs unchanged for longer than the stale threshold.",
        lambda f, now: f.stale_runs,
    ),
    GaugeSpec(
        "error_path_runs_with_locks",
        "Runs on the error path (GENERATED or a failure status) that still hold locks.",
        lambda f, now: f.error_path_runs_with_locks,
    ),
    GaugeSpec(
        "oldest_stuck_lock_age_seconds",
        "Age of the oldest lock held by a COMPLETED run; absent when there is none.",
        lambda f, now: _age_s(f, now),
    ),
    GaugeSpec(
        "make_billing_run_real_deletes_locks",
        "1 if billing_run.make_billing_run_real exists and its body deletes the run's locks.",
        lambda f, now: int(f.procedure.exists and f.procedure.deletes_locks),
    ),
    GaugeSpec(
        "environment_query_duration_seconds",
        "How long reading the environment's figures took.",
        lambda f, now: f.duration_ms / MS_PER_S,
    ),
)


def _age_s(figures: LockFigures, now: datetime) -> float | None:
    age = figures.oldest_stuck_age(now)
    return None if age is None else age.total_seconds()


class LockStatusCollector:
    """Yields the gauges of the statuses it was built with (a prometheus_client Collector)."""

    def __init__(self, statuses: Iterable[EnvironmentStatus], *, now: datetime) -> None:
        self.statuses = list(statuses)
        self.now = now

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{METRIC_PREFIX}environment_up",
            "1 if the environment's figures could be read, 0 if it was unreachable or timed out.",
            labels=LABEL_NAMES,
        )
        for status in self.statuses:
            up.add_metric(_labels(status), 1 if status.reachable else 0)
        yield up
        for spec in FIGURE_GAUGES:
            family = GaugeMetricFamily(f"{METRIC_PREFIX}{spec.name}", spec.documentation, labels=LABEL_NAMES)
            for status in self.statuses:
                if status.figures is None:
                    continue
                value = spec.value(status.figures, self.now)
                if value is not None:
                    family.add_metric(_labels(status), float(value))
            yield family


def _labels(status: EnvironmentStatus) -> list[str]:
    return [status.env.key, status.env.label]


def render_metrics(
    statuses: Iterable[EnvironmentStatus], *, now: datetime | None = None
) -> tuple[bytes, str]:
    """The exposition text and its content type, from a registry of this call's own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LockStatusCollector(statuses, now=now or timezone.now()))
    return generate_latest(registry), CONTENT_TYPE
