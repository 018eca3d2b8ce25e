"""runtime/startup.py: the cyclic collector is held from `python -m runtime`'s start until the
agent is connected, then released once, with what start-up built frozen out of its generations."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from runtime import startup


@pytest.fixture
def gc_state() -> Iterator[None]:
    was_enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    yield
    startup._gc_held = False
    gc.unfreeze()
    if frozen:  # put back what was frozen before the test (nothing, in a plain pytest run)
        gc.freeze()
    (gc.enable if was_enabled else gc.disable)()


def test_hold_then_release_freezes_and_enables_once(gc_state: None) -> None:
    gc.enable()
    gc.unfreeze()
    startup.hold_gc()
    assert not gc.isenabled()
    startup.release_gc()
    assert gc.isenabled() and gc.get_freeze_count() > 0
    gc.unfreeze()
    startup.release_gc()  # the second release (main's finally after the agent's) does nothing
    assert gc.get_freeze_count() == 0


def test_release_without_hold_leaves_the_collector_alone(gc_state: None) -> None:
    gc.disable()  # someone else's choice (a host process that embeds the agent)
    gc.unfreeze()
    startup.hold_gc()  # already off: not ours to turn back on
    startup.release_gc()
    assert not gc.isenabled() and gc.get_freeze_count() == 0
