"""runtime/record.py: a record behaves as the same class under @dataclass(frozen=True) does, in
everything the runtime and the host use (construction and its errors, equality, hashing, repr,
frozenness, __post_init__, and dataclasses' fields / replace / asdict / is_dataclass)."""

from __future__ import annotations

import dataclasses
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from runtime.record import field, field_table, is_record, record


def _pair() -> tuple[type, type]:
    def body(deco: Any, fld: Any) -> type:
        @deco
        class Msg:
            """A message."""

            name: str
            count: int
            secret: str = fld(default="s", repr=False)
            ratio: float | None = None
            extras: Mapping[str, Any] = fld(default_factory=dict)

            def __post_init__(self) -> None:
                if self.count < 0:
                    raise ValueError(f"count {self.count} < 0")

        return Msg

    return body(record, field), body(dataclasses.dataclass(frozen=True), dataclasses.field)


def test_construction_equality_hash_and_repr_match_a_frozen_dataclass() -> None:
    rec, dc = _pair()
    for args, kwargs in (((), {"name": "a", "count": 1}), (("a", 2, "x"), {"ratio": 0.5}), (("a",), {"count": 3})):
        r, d = rec(*args, **kwargs), dc(*args, **kwargs)
        assert repr(r) == repr(d)
        assert r == rec(*args, **kwargs) and r != rec("other", 0)
        assert (r == d) is False  # another class, as between two dataclasses
        assert r.extras == {} and r.extras is not rec(*args, **kwargs).extras  # a fresh default each time
    assert hash(rec("a", 1, extras=())) == hash(rec("a", 1, extras=()))
    with pytest.raises(TypeError):
        hash(rec("a", 1))  # a dict field, as with the dataclass
    assert "secret" not in repr(rec("a", 1)) and rec.__match_args__ == dc.__match_args__


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((), {"name": "a"}, "missing 1 required argument: 'count'"),
    (("a", 1), {"name": "b"}, "multiple values for argument 'name'"),
    (("a", 1), {"colour": "red"}, "unexpected keyword argument 'colour'"),
    (("a", 1, "s", None, {}, 9), {}, "takes 6 positional arguments but 7 were given"),
])
def test_bad_construction_raises_typeerror_naming_the_argument(args: tuple, kwargs: dict, match: str) -> None:
    rec, dc = _pair()
    with pytest.raises(TypeError, match=match):
        rec(*args, **kwargs)
    with pytest.raises(TypeError):
        dc(*args, **kwargs)


def test_frozen_post_init_and_mutable_variant() -> None:
    rec, _ = _pair()
    r = rec("a", 1)
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'name'"):
        r.name = "b"
    with pytest.raises(dataclasses.FrozenInstanceError):
        del r.count
    with pytest.raises(ValueError, match="count -1 < 0"):
        rec("a", -1)

    @record(frozen=False)
    class Box:
        n: int

    b = Box(1)
    b.n = 2
    assert b == Box(2) and Box.__hash__ is None

    @record(eq=False)
    class Held:  # identity equality and hashing, as dataclass(frozen=True, eq=False)
        n: int

    @dataclasses.dataclass(frozen=True, eq=False)
    class HeldDc:
        n: int

    h = Held(1)
    assert h != Held(1) and h == h and hash(h) == object.__hash__(h)
    assert (HeldDc(1) == HeldDc(1)) == (Held(1) == Held(1)) and Held.__hash__ is HeldDc.__hash__
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.n = 2  # type: ignore[misc]


def test_dataclasses_helpers_work_on_records() -> None:
    rec, dc = _pair()
    r = rec("a", 1, ratio=0.5)
    assert dataclasses.is_dataclass(r) and dataclasses.is_dataclass(rec) and is_record(r) and not is_record(dc)
    assert [f.name for f in dataclasses.fields(rec)] == [f.name for f in dataclasses.fields(dc)]
    assert dataclasses.asdict(r) == dataclasses.asdict(dc("a", 1, ratio=0.5))
    r2 = dataclasses.replace(r, count=5)
    assert r2 == rec("a", 5, ratio=0.5) and r2.secret == "s"
    with pytest.raises(ValueError, match="count -1"):
        dataclasses.replace(r, count=-1)
    assert field_table(rec) == field_table(dc) == (("name", False), ("count", False), ("secret", True),
                                                   ("ratio", True), ("extras", True))
    from runtime.protocol import Status  # a module-level record (the trainer pipe pickles some)

    status = Status("dev0", "idle", 1.0, detail="x")
    assert pickle.loads(pickle.dumps(status)) == status


def test_class_definition_errors_match_dataclasses() -> None:
    with pytest.raises(ValueError, match="mutable default <class 'list'> for field xs"):
        @record
        class Bad:
            xs: list = []  # noqa: RUF012

    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):
        @record
        class Order:
            a: int = 0
            b: int


def test_runtime_declares_its_value_classes_as_records() -> None:
    """One way to declare a value class on the board: `@record` (a dataclass on the hello's path
    brings the `dataclasses` import back; off it, two spellings of one thing)."""
    root = Path(__file__).resolve().parents[2] / "runtime"
    offenders = [str(p.relative_to(root)) for p in sorted(root.rglob("*.py"))
                 if p.name != "record.py" and re.search(r"^\s*@(dataclasses\.)?dataclass\b", p.read_text(), re.M)]
    assert offenders == []
