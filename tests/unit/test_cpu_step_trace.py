"""The `step` CPU trace: the quota share drops (e.g. halves) at at_s, and comes back at until_s."""

from __future__ import annotations

import pytest

from runtime.errors import ConfigError
from testbed.traces import make_cpu_trace


def test_step_trace_halves_and_restores() -> None:
    t = make_cpu_trace({"kind": "step", "at_s": 30, "before": 1.0, "after": 0.5, "until_s": 60}, seed=0, base_dir=".")
    assert [t.value_at(s) for s in (0, 29.9, 30, 59.9, 60, 1e4)] == [1.0, 1.0, 0.5, 0.5, 1.0, 1.0]
    assert t.changes(100) == [(0.0, 1.0), (30.0, 0.5), (60.0, 1.0)]
    assert t.changes(100, since_s=30) == [(60.0, 1.0)]
    forever = make_cpu_trace({"kind": "step", "at_s": 10, "before": 0.8, "after": 0.4}, seed=0, base_dir=".")
    assert forever.changes(1e4) == [(0.0, 0.8), (10.0, 0.4)]


@pytest.mark.parametrize(("spec", "match"), [
    ({"kind": "step", "at_s": 10, "before": 1.0, "after": 0}, "after"),
    ({"kind": "step", "at_s": 10, "before": 1.5, "after": 0.5}, "before"),
    ({"kind": "step", "at_s": 10, "before": 1.0, "after": 0.5, "until_s": 5}, "until_s"),
    ({"kind": "step", "at_s": 10, "before": 1.0, "after": 0.5, "sigma": 1}, "sigma"),
])
def test_bad_step_traces_name_the_key(spec, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make_cpu_trace(spec, seed=0, base_dir=".")
