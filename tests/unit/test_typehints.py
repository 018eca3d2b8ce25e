"""The 3.8/3.9 evaluation of the wire dataclasses' annotations gives the types 3.10+ gives."""

from __future__ import annotations

import dataclasses
import types
import typing

from runtime import protocol
from runtime.typehints import old_type_hints


def _norm(hint: typing.Any) -> typing.Any:
    origin = typing.get_origin(hint)
    if origin is None:
        return hint
    if origin is types.UnionType:
        origin = typing.Union
    return (origin, tuple(_norm(a) for a in typing.get_args(hint)))


def test_old_hints_match_get_type_hints_for_every_wire_dataclass() -> None:
    classes = [c for c in vars(protocol).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    assert len(classes) >= 8
    for cls in classes:
        new, old = typing.get_type_hints(cls), old_type_hints(cls)
        assert set(new) == set(old), cls
        for name in new:
            assert _norm(new[name]) == _norm(old[name]), (cls.__name__, name, new[name], old[name])
