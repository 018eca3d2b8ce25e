"""The testbed bench's fleet search: which N it runs next (bench/testbed_bench.py). The search is
only run on request (ORCHARD_BENCH_TESTBED_MAX_N); `make bench` runs the fixed ladder."""

from __future__ import annotations

from bench.testbed_bench import FIXED_LADDER, START_N, _next_n


def _search(largest_ok: int, max_n: int) -> list[int]:
    """The N a search runs when every N <= largest_ok keeps up and every larger one does not."""
    ran, good, bad = [], 0, None
    n: int | None = START_N
    while n is not None:
        ran.append(n)
        good, bad = (n, bad) if n <= largest_ok else (good, n)
        n = _next_n(good, bad, max_n)
    return ran


def test_the_search_doubles_then_bisects_in_steps_of_8():
    assert _search(100, 256) == [32, 64, 128, 96, 112, 104]
    assert _search(64, 256) == [32, 64, 128, 96, 80, 72]


def test_the_search_stops_at_max_n_and_halves_below_32():
    assert _search(1000, 128) == [32, 64, 128]
    assert _search(20, 256) == [32, 16, 24]
    assert _search(4, 256) == [32, 16, 8]


def test_make_bench_runs_the_fixed_ladder_only():
    assert FIXED_LADDER == (START_N,)
