"""`make soak`: concurrent users browsing the dashboard while heavy jobs run on the worker.

Run by ``python -m billing_ops.devstack soak`` against the stack it started (web, worker and
beat as `make run` starts them, on a free port, with a Celery queue of their own). Here:

1. ``--users`` viewer accounts (``soak-viewer-NN``, fresh random passwords) each sign in
   through ``/login/`` with the form's CSRF token, over a keep-alive connection of their own;
2. every user loops: the overview, an environment's stuck-runs page, then the drill-down of
   a run linked from it (of a run holding locks where none is stuck), going through all
   environments, with ``--think`` seconds (on average) between pages;
3. after ``--baseline-seconds`` of that (the figures without jobs), the release of every lock
   of ``BILLING202511200006`` in the Dev demo (156,651 locks; previewed beforehand) and an
   upsert of a ``--lines``-line CSV into Dev's invoice lines (one line in ten an existing
   one) are requested through the product's own services, as an operator would: the real
   worker runs both, while the users go on until both jobs have finished and at least
   ``--min-seconds`` have passed;
4. prints p50/p95/max per page kind and phase (before, during, after the jobs), every error
   (any answer but 200, or an exception; samples of each kind are printed) and the jobs'
   durations from their Job rows (started_at to finished_at).

Exits 1 when there was an error, a job did not succeed, or a page kind's p95 exceeded
``--max-p95`` seconds (0: no limit; ``--short`` sets 10 s). Standard library HTTP only.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import math
import os
import random
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import django

BIG_RUN_NUMBER = "BILLING202511200006"
JOB_ENVIRONMENT = "dev"
REQUEST_TIMEOUT_S = 120
ERROR_SAMPLES = 5
START_SPREAD_S = 3.0
# --short fails when a page kind's p95 is over this: far above what a busy 2-core machine
# shows (about 3.5 s for the overview), far below a page waiting on a job or a timeout.
SHORT_MAX_P95_S = 10.0
PAGE_KINDS = ("overview", "stuck-runs", "drill-down")
RUN_LINK = re.compile(r'href="/environments/([\w-]+)/runs/(\d+)/"')
CSRF_FIELD = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


# --- The HTTP side: one keep-alive connection and cookie jar per user ------------------------------


class PageError(Exception):
    pass


class Browser:
    """A signed-in user: one persistent connection, the session and CSRF cookies."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.cookies: dict[str, str] = {}
        self.conn: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, dict[str, str], str]:
        headers = {"Host": f"{self.host}:{self.port}", "User-Agent": "billing-ops-soak"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            headers["Referer"] = f"http://{self.host}:{self.port}{path}"
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                text = response.read().decode("utf-8", "replace")
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle keep-alive connection: one new connection, as a
                # browser would (counted and reported); a second failure is an error.
                self.close()
                if attempt == 2:
                    raise
                self.reconnects += 1
        for value in response.headers.get_all("Set-Cookie") or []:
            cookie = SimpleCookie()
            cookie.load(value)
            for name, morsel in cookie.items():
                self.cookies[name] = morsel.value
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, text

    def login(self, username: str, password: str) -> None:
        status, _headers, text = self.request("GET", "/login/")
        match = CSRF_FIELD.search(text)
        if status != 200 or not match:
            raise PageError(f"GET /login/: {status}, no CSRF token in the form")
        form = urlencode({"csrfmiddlewaretoken": match.group(1), "username": username, "password": password})
        status, headers, _text = self.request("POST", "/login/", body=form)
        if status != 302 or "sessionid" not in self.cookies:
            raise PageError(f"POST /login/ as {username}: {status} (location {headers.get('location')!r})")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# --- Measurements ----------------------------------------------------------------------------------


PHASES = {
    "idle": "before the jobs (baseline)",
    "jobs": "while the jobs ran",
    "after": "after both jobs had finished",
}


@dataclass
class Results:
    """Page times by phase and kind; errors by kind and what went wrong, with samples."""

    phase: str = "idle"  # set by the main thread; a page counts in the phase it began in
    times: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, phase: str, kind: str, seconds: float) -> None:
        with self.lock:
            self.times[(phase, kind)].append(seconds)

    def error(self, phase: str, kind: str, what: str, sample: str) -> None:
        with self.lock:
            key = f"{kind} ({PHASES[phase]}): {what}"
            self.errors[key] += 1
            if len(self.samples[key]) < ERROR_SAMPLES:
                self.samples[key].append(sample)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p % of them at or below it."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered), math.ceil(p / 100 * len(ordered))) - 1)]


class User(threading.Thread):
    def __init__(
        self,
        index: int,
        browser: Browser,
        envs: list[str],
        fallback_runs: dict[str, list[int]],
        results: Results,
        stop: threading.Event,
        think_s: float,
    ) -> None:
        super().__init__(daemon=True, name=f"soak-user-{index}")
        self.browser, self.results, self.stop, self.think_s = browser, results, stop, think_s
        # Each user starts at another environment and goes through them all in turn.
        self.envs = envs[index % len(envs) :] + envs[: index % len(envs)]
        self.fallback_runs = fallback_runs
        self.rng = random.Random(index)

    def get(self, kind: str, path: str) -> str | None:
        phase = self.results.phase
        started = time.perf_counter()
        try:
            status, headers, text = self.browser.request("GET", path)
        except Exception as exc:  # every failure counts, whatever it is
            self.results.error(phase, kind, type(exc).__name__, f"GET {path}: {exc!r}")
            self.browser.close()
            return None
        elapsed = time.perf_counter() - started
        if status != 200:
            where = f" -> {headers.get('location')}" if "location" in headers else ""
            self.results.error(phase, kind, f"HTTP {status}", f"GET {path}: {status}{where} {text[:300]!r}")
            return None
        self.results.ok(phase, kind, elapsed)
        return text

    def think(self) -> None:
        if self.think_s:
            self.stop.wait(self.rng.uniform(0.5, 1.5) * self.think_s)

    def run(self) -> None:
        # Users arrive over the first seconds, not all on the overview at the same instant.
        self.stop.wait(self.rng.uniform(0, START_SPREAD_S))
        while not self.stop.is_set():
            for env in self.envs:
                if self.stop.is_set():
                    return
                self.get("overview", "/")
                self.think()
                page = self.get("stuck-runs", f"/environments/{env}/stuck-runs/")
                self.think()
                linked = [int(r) for e, r in RUN_LINK.findall(page or "") if e == env]
                runs = linked or self.fallback_runs.get(env, [])
                if runs:
                    self.get("drill-down", f"/environments/{env}/runs/{self.rng.choice(runs)}/")
                    self.think()


# --- The jobs, through the product's services -------------------------------------------------------


def _account(username: str, group: str, password: str) -> Any:
    from django.contrib.auth.models import Group, User

    user, _created = User.objects.get_or_create(username=username)
    user.set_password(password)
    user.is_active = True
    user.save()
    user.groups.set([Group.objects.get(name=group)])
    return user


def _runs_holding_locks(env: Any, limit: int = 10) -> list[int]:
    from billing_ops.environments import environment_connect

    with environment_connect(env) as conn:
        rows = conn.execute(
            "SELECT billing_id FROM lock.locks WHERE billing_id IS NOT NULL "
            "GROUP BY billing_id ORDER BY count(*) DESC LIMIT %s",
            [limit],
        ).fetchall()
        if not rows:
            rows = conn.execute(
                "SELECT id FROM billing.billings ORDER BY id DESC LIMIT %s", [limit]
            ).fetchall()
    return [int(r[0]) for r in rows]


def _job_summary(job: Any) -> str:
    seconds = (
        (job.finished_at - job.started_at).total_seconds() if job.started_at and job.finished_at else None
    )
    waited = (job.started_at - job.requested_at).total_seconds() if job.started_at else None
    took = f"{seconds:,.1f} s" if seconds is not None else "-"
    queued = f", {waited:.1f} s in the queue before" if waited is not None else ""
    return f"job {job.pk} {job.status}: {took} (started_at -> finished_at{queued})"


def write_csv(path: Path, count: int, existing: list[tuple[str, ...]]) -> int:
    """The upsert's file: one line in ten is one of the environment's ``existing`` lines
    (half in another spelling of the description, half with a new amount), the rest are new
    lines (tests/bench/bench_upsert.py's generator, whose invoice ids the demo does not use).
    Returns how many lines match existing ones."""
    from tests.bench.bench_upsert import EXISTING, line

    matched = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["invoice_id", "unit_id", "line_type", "description", "quantity", "amount"])
        for k in range(count):
            if k % 10 == 0 and k // 10 < len(existing):
                inv, unit, lt, desc, q, a = existing[k // 10]
                if k % 20 == 0:
                    desc = "  " + desc.upper().replace(" ", "   ") + " "
                else:
                    a = f"{Decimal(a) + 1:.2f}"
                w.writerow((inv, unit, lt, desc, q, a))
                matched += 1
            else:
                w.writerow(line(EXISTING + k))
    return matched


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the dashboard, e.g. http://127.0.0.1:8000")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines of the upserted CSV")
    parser.add_argument("--short", action="store_true", help="for CI: 50,000 lines, bounded, p95 limit")
    parser.add_argument("--think", type=float, default=1.0, help="mean seconds between a user's pages")
    parser.add_argument(
        "--baseline-seconds", type=float, default=None, help="browse this long before the jobs"
    )
    parser.add_argument("--min-seconds", type=float, default=30.0, help="browse at least this long with jobs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up on the jobs after this (s)")
    parser.add_argument("--max-p95", type=float, default=None, help="fail above this p95 (s); 0: no limit")
    args = parser.parse_args(argv)
    if args.short:
        args.lines = min(args.lines, 50_000)
        args.timeout = min(args.timeout, 300.0)
    baseline_s = (
        args.baseline_seconds if args.baseline_seconds is not None else (10.0 if args.short else 30.0)
    )
    max_p95 = args.max_p95 if args.max_p95 is not None else (SHORT_MAX_P95_S if args.short else 0.0)

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_ops.settings")
    django.setup()
    from django.conf import settings
    from django.db import close_old_connections

    from billing_ops.environments import all_environments, environment_connect, get_environment
    from billing_ops.models import FINISHED_STATUSES, Job, JobStatus
    from locks import release
    from reconciliation.services import file_chunks, upsert_request

    envs = all_environments()
    env = get_environment(JOB_ENVIRONMENT)
    print(
        f"\nSoak: {args.users} users browse while a {args.lines:,}-line upsert and the release of "
        f"{BIG_RUN_NUMBER} run in {env.label}; {args.url}, queue {settings.CELERY_QUEUE}",
        flush=True,
    )
    print(f"  load average before: {_loadavg()}", flush=True)

    with environment_connect(env) as conn:
        row = conn.execute(
            "SELECT b.id, (SELECT count(*) FROM lock.locks l WHERE l.billing_id = b.id) "
            "FROM billing.billings b WHERE b.billing_number = %s",
            [BIG_RUN_NUMBER],
        ).fetchone()
        existing = conn.execute(
            "SELECT invoice_id, unit_id, line_type, description, quantity::text, amount::text "
            "FROM public.invoice_lines ORDER BY invoice_id, line_type LIMIT %s",
            [args.lines // 10],
        ).fetchall()
    if row is None:
        print(f"  {BIG_RUN_NUMBER} is not in {env.label}: is the demo seeded?", file=sys.stderr)
        return 1
    run_id, run_locks = row
    fallback_runs = {e.key: _runs_holding_locks(e) for e in envs}

    operator = _account("soak-operator", "Operator", secrets.token_urlsafe(16))
    passwords = {f"soak-viewer-{i:02d}": secrets.token_urlsafe(16) for i in range(1, args.users + 1)}
    for name, password in passwords.items():
        _account(name, "Viewer", password)
    browsers = []
    for name, password in passwords.items():
        browser = Browser(args.url)
        browser.login(name, password)
        browsers.append(browser)
    print(f"  {len(browsers)} viewers signed in through /login/", flush=True)
    # Unmeasured: each environment's stuck-runs page once, so that the baseline is not the
    # cost of the first visits (the entity-type lists are cached for ten minutes).
    for key in [e.key for e in envs]:
        browsers[0].request("GET", f"/environments/{key}/stuck-runs/")
    browsers[0].request("GET", "/")

    results = Results()
    stop = threading.Event()
    users = [
        User(i, b, [e.key for e in envs], fallback_runs, results, stop, args.think)
        for i, b in enumerate(browsers)
    ]
    with tempfile.TemporaryDirectory(prefix="billing-ops-soak-") as tmp:
        csv_path = Path(tmp) / f"soak_{args.lines}.csv"
        started = time.perf_counter()
        matched = write_csv(csv_path, args.lines, existing)
        print(
            f"  CSV of {args.lines:,} lines ({csv_path.stat().st_size / 1e6:.0f} MB, {matched:,} of them "
            f"existing lines of {env.label}) written in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        started = time.perf_counter()
        plan = release.release_plan_prepare(actor=operator, env=env, run_ids=[run_id], system_only=False)
        print(
            f"  release preview of {plan.lock_count:,} locks in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        for user in users:
            user.start()
        print(f"  browsing for {baseline_s:g} s before the jobs...", flush=True)
        time.sleep(baseline_s)
        results.phase = "jobs"
        load_started = time.perf_counter()
        upsert_job = upsert_request(
            actor=operator,
            environment=env.key,
            chunks=file_chunks(csv_path),
            csv_name=csv_path.name,
            run_id=f"soak-{datetime.now(UTC):%Y%m%d%H%M%S}",
            batch_size=settings.RECONCILIATION_BATCH_SIZE,
            dry_run=False,
        )
    release_job = release.release_request(actor=operator, plan_id=plan.pk, digest=plan.digest)
    print(f"  queued: upsert job {upsert_job.pk}, release job {release_job.pk}; browsing...", flush=True)

    timed_out, jobs_s = False, 0.0
    job_ids = [upsert_job.pk, release_job.pk]
    while True:
        time.sleep(1)
        close_old_connections()
        done = Job.objects.filter(pk__in=job_ids, status__in=FINISHED_STATUSES).count() == len(job_ids)
        if done and results.phase == "jobs":
            results.phase = "after"
            jobs_s = time.perf_counter() - load_started
        elapsed = time.perf_counter() - load_started
        if done and elapsed >= args.min_seconds:
            break
        if elapsed > args.timeout:
            timed_out = True
            jobs_s = elapsed
            break
    stop.set()
    for user in users:
        user.join(timeout=REQUEST_TIMEOUT_S + 10)
    reconnects = sum(b.reconnects for b in browsers)
    for browser in browsers:
        browser.close()
    for name in [*passwords, operator.username]:  # no sign-in left behind with a known password
        _account(name, "Operator" if name == operator.username else "Viewer", secrets.token_urlsafe(32))

    upsert_job.refresh_from_db()
    release_job.refresh_from_db()
    print(
        f"\n  {len(users)} users, {args.think:g} s think time on average between pages; "
        f"{baseline_s:g} s before the jobs, {jobs_s:.1f} s until both had finished; "
        f"load average after: {_loadavg()}"
    )
    failures = _report_pages(results, max_p95=max_p95)
    print(f"  keep-alive connections the server had closed, opened again: {reconnects}")
    _report_jobs(upsert_job, release_job, lines=args.lines, run_locks=run_locks)
    if timed_out:
        failures.append(f"the jobs did not finish within {args.timeout:.0f} s")
    for job in (upsert_job, release_job):
        if job.status != JobStatus.SUCCEEDED:
            failures.append(f"{job.kind} job {job.pk} ended {job.status}: {job.error[:500]}")
    if failures:
        print("\nSOAK FAILED:\n  " + "\n  ".join(failures), flush=True)
        return 1
    print(
        "\nSoak passed: no errors, both jobs succeeded" + (f", p95 under {max_p95:g} s." if max_p95 else ".")
    )
    return 0


def _loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def _report_pages(results: Results, *, max_p95: float) -> list[str]:
    failures = []
    for phase, title in PHASES.items():
        rows = {kind: results.times.get((phase, kind), []) for kind in PAGE_KINDS}
        if not any(rows.values()):
            continue
        print(f"  pages {title}:")
        print(f"    {'page':<12} {'count':>7} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
        for kind, values in rows.items():
            if not values:
                if phase == "jobs":
                    print(f"    {kind:<12} {0:>7}")
                continue
            p50, p95 = statistics.median(values), percentile(values, 95)
            figures = f"{p50 * 1000:>9.0f} {p95 * 1000:>9.0f} {max(values) * 1000:>9.0f}"
            print(f"    {kind:<12} {len(values):>7,} {figures}")
            if max_p95 and p95 > max_p95:
                failures.append(f"{kind} p95 {title} {p95:.2f} s is over the limit of {max_p95:g} s")
    for kind in PAGE_KINDS:
        if not results.times.get(("jobs", kind)):
            failures.append(f"no {kind} page answered while the jobs ran")
    errors = sum(results.errors.values())
    print(f"  errors: {errors}")
    for key, count in results.errors.most_common():
        print(f"    {key}: {count}")
        for sample in results.samples[key]:
            print(f"      {sample}")
    if errors:
        failures.append(f"{errors} page requests failed")
    return failures


def _report_jobs(upsert_job: Any, release_job: Any, *, lines: int, run_locks: int) -> None:
    upsert = upsert_job.result or {}
    print(f"  upsert of {lines:,} lines: {_job_summary(upsert_job)}")
    counts = ", ".join(
        f"{k} {upsert[k]:,}" for k in ("inserted", "updated", "unchanged", "audit_rows") if k in upsert
    )
    if counts:
        print(f"    {counts}")
    released = (release_job.result or {}).get("released")
    print(f"  release of {BIG_RUN_NUMBER} ({run_locks:,} locks): {_job_summary(release_job)}")
    if released is not None:
        print(f"    released {released:,}")


if __name__ == "__main__":
    sys.exit(main())
