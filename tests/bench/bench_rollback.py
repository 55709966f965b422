"""Benchmark: rolling back a 100,000-line upsert run (runbook §6.2).

In a scratch database on the Dev environment's server (as ``bench_upsert``): 100,000
existing lines, then a real upsert of a 100,000-line CSV (90,000 inserts, 10,000 lines
matching existing ones: half re-spelled, half with new amounts), with its audit chain.
Then, from that same state each time:

- bare: the SQL that reads the same rows, the run's audit rows joined to their lines
  (what the rollback must look at), fetched;
- preview: ``reconciliation.rollback.preview_on`` (the plan, its digest and a page);
- rollback: ``reconciliation.rollback.rollback_run`` (lock, plan, digest check, deletes
  and restores, one chained audit row per line), committed.

The rollback is destructive, so each repetition rebuilds the state (untimed).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from tests.bench.bench_upsert import EXISTING, reset, scratch_database, write_csv

SIZE = 100_000
REPEATS = 3
SCRATCH_DB = "billing_ops_bench_rollback"
RUN_ID = "bench-rollback"

BARE_SQL = """
SELECT a.id, a.record_id, a.old_data, a.new_data, l.*
  FROM public.audit_logs a
  LEFT JOIN public.invoice_lines l ON l.id = a.record_id::uuid
 WHERE a.action = 'upsert_missing_lines' AND a.new_data ->> 'run_id' = %s
"""


class _Quiet:
    def log(self, message: str) -> None:
        pass

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        pass

    def check_cancel(self) -> None:
        pass


def _upsert(url: str, path: Path) -> None:
    from reconciliation.csvfile import read_header
    from reconciliation.upsert import batch_upsert

    with psycopg.connect(url) as conn:
        batch_upsert(
            conn,
            csv_path=path,
            csv_name=path.name,
            header=read_header(path),
            run_id=RUN_ID,
            batch_size=50_000,
            dry_run=False,
            report=_Quiet(),
        )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE public.invoice_lines")
        conn.execute("VACUUM ANALYZE public.audit_logs")


def main() -> None:
    from reconciliation.rollback import preview_on, rollback_run

    with scratch_database(SCRATCH_DB) as (url, _server):
        bare: list[float] = []
        previews: list[float] = []
        rollbacks: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "run.csv"
            write_csv(path, SIZE)
            for _ in range(REPEATS):
                reset(url)
                _upsert(url, path)
                with psycopg.connect(url) as conn, conn.cursor() as cur:
                    started = time.perf_counter()
                    cur.execute(BARE_SQL, [RUN_ID])
                    rows = len(cur.fetchall())
                    bare.append(time.perf_counter() - started)
                with psycopg.connect(url) as conn:
                    started = time.perf_counter()
                    preview = preview_on(conn, RUN_ID)
                    previews.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    outcome = rollback_run(
                        conn, run_id=RUN_ID, approved_digest=preview.digest, job_id=0, report=_Quiet()
                    )
                    rollbacks.append(time.perf_counter() - started)
        b, p, r = (statistics.median(x) for x in (bare, previews, rollbacks))
        print(f"\nRollback of a {SIZE:,}-line upsert run ({EXISTING:,} lines before it; median of {REPEATS})")
        print(f"  run's audit rows: {rows:,} ({preview.delete:,} to delete, {preview.restore:,} to restore)")
        print(f"  bare SQL reading the same rows (audit rows + lines)  {b * 1000:8,.0f} ms")
        print(f"  preview (plan, digest, first page)                    {p * 1000:8,.0f} ms  ({p / b:.1f}x)")
        print(
            f"  rollback (lock, plan, delete/restore, audit chain)    {r * 1000:8,.0f} ms  ({r / b:.1f}x,"
            f" {outcome.audit_rows / r:,.0f} lines/s)"
        )
