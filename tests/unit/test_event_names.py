"""Event names come from one enum (server.events.EventName): the engine, the service and the
campaign runner write only its members, and the report and the live view read only them."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from server.events import EventName

ROOT = Path(__file__).resolve().parents[2]
USERS = ("server/engine.py", "server/service.py", "testbed/runner.py", "testbed/report.py", "testbed/live.py")


@pytest.mark.parametrize("path", USERS)
def test_no_event_name_is_spelled_out(path: str) -> None:
    names = {e.value for e in EventName}
    tree = ast.parse((ROOT / path).read_text())
    # Text inside f-strings is display (a column called "oom"), not a name compared or written.
    display = {id(c) for f in ast.walk(tree) if isinstance(f, ast.JoinedStr) for c in ast.walk(f)}
    spelled = sorted({n.value for n in ast.walk(tree)
                      if isinstance(n, ast.Constant) and n.value in names and id(n) not in display})
    assert not spelled, f"{path} spells event names {spelled}; use EventName"


def test_names_are_plain_strings_in_the_log() -> None:
    assert json.dumps({"event": EventName.TASK_SENT}) == '{"event": "task_sent"}'
    assert EventName("update_rejected").is_rejection and not EventName.UPDATE_ACCEPTED.is_rejection
