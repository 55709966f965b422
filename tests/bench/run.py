"""`make bench`: every benchmark against the demo environments, printing figures.

Benchmarks are not tests: nothing here asserts a time; the figures go to the README.
"""

from __future__ import annotations

import os
import sys

import django


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_ops.settings")
    django.setup()
    from tests.bench import bench_chain, bench_locks, bench_release, bench_rollback, bench_seed, bench_upsert

    names = sys.argv[1:] or ["seed", "locks", "release", "upsert", "rollback", "chain"]
    if "seed" in names:
        bench_seed.main()
    if "locks" in names:
        bench_locks.main()
    if "release" in names:
        bench_release.main()
    if "upsert" in names:
        bench_upsert.main()
    if "rollback" in names:
        bench_rollback.main()
    if "chain" in names:
        bench_chain.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
