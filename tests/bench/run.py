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
    from tests.bench import (
        bench_chain,
        bench_locks,
        bench_lookup,
        bench_release,
        bench_rollback,
        bench_seed,
        bench_upsert,
    )

    benches = {
        "seed": bench_seed,
        "locks": bench_locks,
        "lookup": bench_lookup,
        "release": bench_release,
        "upsert": bench_upsert,
        "rollback": bench_rollback,
        "chain": bench_chain,
    }
    names = sys.argv[1:] or list(benches)
    for name in benches:  # in this order, whatever the order asked
        if name in names:
            benches[name].main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
