"""Run one batch upsert in this process and print its figures and peak RSS as JSON.

    python -m tests.bench.upsert_child URL CSV RUN_ID BATCH_SIZE

(bench_upsert runs it as a child, so that its peak memory is the upsert's alone.)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import django


class StageClock:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.last = self.started
        self.stages: list[str] = []

    def log(self, message: str) -> None:
        now = time.perf_counter()
        self.stages.append(
            f"{message.removeprefix('[batch_upsert] ')[:40]} +{(now - self.last) * 1000:.0f}ms"
        )
        self.last = now

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        if message.startswith("Normalized"):  # the normalization and dedup, before the batches
            self.log("deduplicated, existing lines locked")

    def check_cancel(self) -> None:
        pass


def peak_rss_kb() -> int:
    """This program's peak resident memory. VmHWM starts afresh at exec; ru_maxrss would also
    count the pages of the parent the child was forked from."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_ops.settings")
    django.setup()
    import psycopg

    from reconciliation.csvfile import read_header
    from reconciliation.upsert import batch_upsert

    url, csv_path, run_id, batch = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    ready_kb = peak_rss_kb()  # Django and psycopg loaded
    clock = StageClock()
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        outcome = batch_upsert(
            conn,
            csv_path=csv_path,
            csv_name=csv_path.name,
            header=read_header(csv_path),
            run_id=run_id,
            batch_size=batch,
            dry_run=False,
            report=clock,
        )
    seconds = time.perf_counter() - started
    peak_kb = peak_rss_kb()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mb": peak_kb / 1024,
                "ready_rss_mb": ready_kb / 1024,
                "outcome": outcome.as_result(),
                "stages": "; ".join(clock.stages[1:]),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
