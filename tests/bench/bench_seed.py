"""Benchmark: building the demo environments from empty, and a second run that finds them
seeded (what `make run` does at every start)."""

from __future__ import annotations

import time

from billing_ops.demo import seed_environment
from billing_ops.environments import all_environments


def main() -> None:
    envs = [env for env in all_environments() if env.demo]
    print("\nDemo seed (seed_demo), per environment:")
    total_reset = total_again = 0.0
    for env in envs:
        started = time.perf_counter()
        result = seed_environment(env, reset=True)
        reset_s = time.perf_counter() - started
        started = time.perf_counter()
        again = seed_environment(env)
        again_s = time.perf_counter() - started
        total_reset += reset_s
        total_again += again_s
        print(
            f"  {env.label:<12} {result.locks:>9,} locks  rebuilt {reset_s:6.2f} s  "
            f"second run {again_s:5.2f} s ({again.outcome})"
        )
    print(f"  {'all':<12} {'':>15}  rebuilt {total_reset:6.2f} s  second run {total_again:5.2f} s")
