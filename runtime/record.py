"""`@record`: the runtime's value classes (wire messages, configs, events), as frozen dataclasses
would make them, without generating code per class.

Why (issue 16 part 4): `@dataclass` writes each class's `__init__`, `__repr__`, `__eq__`,
`__hash__`, `__setattr__` and `__delattr__` as source text and compiles it (plus, for a class
without a docstring, an `inspect.signature` call), and `import dataclasses` brings inspect, ast,
dis and tokenize. The agent defines 28 such classes before its hello: about 0.5 ms of CPU each on
this host, and a Pi Zero 2 W's whole budget to the hello is 95 ms. A record's methods are the
shared functions below, reading the class's field table, so defining one costs a loop over its
annotations.

Same behaviour as `@dataclass(frozen=True)` for what the runtime uses: fields from the class's
annotations in order (ClassVar skipped), defaults and `field(default=, default_factory=, repr=,
compare=)`, `__post_init__`, positional or keyword construction with the same TypeErrors for a
missing, repeated or unknown argument, value equality and hashing over the compared fields,
`__repr__` without the repr=False fields, `dataclasses.FrozenInstanceError` on assignment or
deletion. `dataclasses.is_dataclass`, `fields`, `replace` and `asdict` work on records: their
`__dataclass_fields__` (real `dataclasses.Field` objects) is built on first access, which is the
first time `dataclasses` is imported on that path. `record(frozen=False)` makes a mutable one
(not hashable, as a dataclass with eq and not frozen); `record(eq=False)` keeps identity equality
and hashing, as `dataclass(eq=False)` does.

Board code: Python 3.8 compatible; `dataclasses` private names used: `_FIELD` (the field kind).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Tuple, TypeVar, overload

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class _FieldSpec:
    """What `field()` puts in a class body until `@record` reads it."""

    __slots__ = ("compare", "default", "default_factory", "repr")

    def __init__(self, default: Any, default_factory: Any, repr: bool, compare: bool) -> None:
        self.default, self.default_factory, self.repr, self.compare = default, default_factory, repr, compare


if TYPE_CHECKING:
    from dataclasses import field as field
    from typing import dataclass_transform  # 3.11+: read by the type checker only
else:
    def field(*, default: Any = MISSING, default_factory: Any = MISSING, repr: bool = True,
              compare: bool = True) -> Any:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        return _FieldSpec(default, default_factory, repr, compare)

    def dataclass_transform(**_: Any) -> Callable[[T], T]:
        return lambda f: f


# One field: (name, annotation, default, default_factory, repr, compare)
_Spec = Tuple[str, Any, Any, Any, bool, bool]


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    names = cls.__record_names__
    if len(args) > len(names):
        raise TypeError(f"{cls.__qualname__}.__init__() takes {len(names) + 1} positional arguments but "
                        f"{len(args) + 1} were given")
    put = object.__setattr__
    for i, (name, _, default, factory, _, _) in enumerate(cls.__record_fields__):
        if i < len(args):
            if name in kwargs:
                raise TypeError(f"{cls.__qualname__}.__init__() got multiple values for argument '{name}'")
            value = args[i]
        elif name in kwargs:
            value = kwargs.pop(name)
        elif default is not MISSING:
            value = default
        elif factory is not MISSING:
            value = factory()
        else:
            raise TypeError(f"{cls.__qualname__}.__init__() missing 1 required argument: '{name}'")
        put(self, name, value)
    if kwargs:
        raise TypeError(f"{cls.__qualname__}.__init__() got an unexpected keyword argument '{next(iter(kwargs))}'")
    post = cls.__record_post_init__
    if post is not None:
        post(self)


def _repr(self: Any) -> str:
    cls = type(self)
    inner = ", ".join(f"{s[0]}={getattr(self, s[0])!r}" for s in cls.__record_fields__ if s[4])
    return f"{cls.__qualname__}({inner})"


def _key(self: Any) -> tuple[Any, ...]:
    return tuple(getattr(self, s[0]) for s in type(self).__record_fields__ if s[5])


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is self.__class__:
        return _key(self) == _key(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(_key(self))


def _frozen_error(message: str) -> Exception:
    from dataclasses import FrozenInstanceError  # only a bug gets here

    return FrozenInstanceError(message)


def _setattr(self: Any, name: str, value: Any) -> None:
    raise _frozen_error(f"cannot assign to field {name!r}")


def _delattr(self: Any, name: str) -> None:
    raise _frozen_error(f"cannot delete field {name!r}")


class _DataclassFields:
    """`cls.__dataclass_fields__`, made on first access (module doc), then stored in its place."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __get__(self, obj: object, owner: type | None = None) -> dict[str, Any]:
        import dataclasses

        table: dict[str, Any] = {}
        for name, hint, default, factory, rep, compare in self.cls.__record_fields__:  # type: ignore[attr-defined]
            f: Any = dataclasses.field(default=default if default is not MISSING else dataclasses.MISSING,
                                       default_factory=factory if factory is not MISSING else dataclasses.MISSING,
                                       repr=rep, compare=compare)
            f.name, f.type = name, hint
            f._field_type = dataclasses._FIELD  # type: ignore[attr-defined]  # private: the field kind
            if hasattr(f, "kw_only"):  # 3.10+
                f.kw_only = False
            table[name] = f
        type.__setattr__(self.cls, "__dataclass_fields__", table)
        return table


def _is_classvar(hint: Any) -> bool:
    text = hint if isinstance(hint, str) else getattr(hint, "__origin__", None) and str(hint)
    return isinstance(text, str) and text.startswith(("ClassVar", "typing.ClassVar"))


def _make(cls: type, frozen: bool, eq: bool) -> type:
    specs: list[_Spec] = []
    for base in reversed(cls.__mro__[1:]):
        specs.extend(base.__dict__.get("__record_fields__", ()))
    own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063  (the class's own, as dataclasses reads them)
    for name, hint in own.items():
        if _is_classvar(hint):
            continue
        value = cls.__dict__.get(name, MISSING)
        if isinstance(value, _FieldSpec):
            spec: _Spec = (name, hint, value.default, value.default_factory, value.repr, value.compare)
            if value.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, value.default)
        else:
            if value is not MISSING and type(value).__hash__ is None:  # dataclass's rule, the same error
                raise ValueError(f"mutable default {type(value)} for field {name} is not allowed: "
                                 "use default_factory")
            spec = (name, hint, value, MISSING, True, True)
        specs = [s for s in specs if s[0] != name] + [spec]
    seen_default = False
    for name, _, default, factory, _, _ in specs:
        if default is not MISSING or factory is not MISSING:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument '{name}' follows default argument")
    attrs: dict[str, Any] = {
        "__record_fields__": tuple(specs), "__record_names__": tuple(s[0] for s in specs),
        "__record_post_init__": cls.__dict__.get("__post_init__"), "__init__": _init, "__repr__": _repr,
        "__match_args__": tuple(s[0] for s in specs), "__dataclass_fields__": _DataclassFields(cls),
    }
    if eq:
        attrs.update(__eq__=_eq, __hash__=_hash if frozen else None)
    if frozen:
        attrs.update(__setattr__=_setattr, __delattr__=_delattr)
    for key, value in attrs.items():
        if key in ("__repr__", "__eq__", "__hash__") and key in cls.__dict__:
            continue  # the class's own, as a dataclass keeps it
        setattr(cls, key, value)
    if cls.__dict__.get("__post_init__") is None:
        cls.__record_post_init__ = next(  # type: ignore[attr-defined]
            (b.__dict__["__post_init__"] for b in cls.__mro__[1:] if "__post_init__" in b.__dict__), None)
    return cls


@overload
def record(cls: type[T]) -> type[T]: ...


@overload
def record(*, frozen: bool = True, eq: bool = True) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls: type | None = None, *, frozen: bool = True, eq: bool = True) -> Any:
    if cls is None:
        return lambda c: _make(c, frozen, eq)
    return _make(cls, frozen, eq)


def is_record(obj: Any) -> bool:
    """A record class or instance (`dataclasses.is_dataclass`, without importing dataclasses)."""
    return hasattr(obj if isinstance(obj, type) else type(obj), "__record_fields__")


def replace(obj: T, **changes: Any) -> T:
    """`dataclasses.replace` for a record (a new one, __post_init__ run), without importing it."""
    values = {name: getattr(obj, name) for name in type(obj).__record_names__}  # type: ignore[attr-defined]
    unknown = sorted(set(changes) - set(values))
    if unknown:
        raise TypeError(f"{type(obj).__qualname__} has no field {unknown[0]!r}")
    values.update(changes)
    return type(obj)(**values)


def field_table(cls_or_obj: Any) -> tuple[tuple[str, bool], ...]:
    """(name, has a default) of each field of a record or a dataclass, in order."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    specs = getattr(cls, "__record_fields__", None)
    if specs is not None:
        return tuple((s[0], s[2] is not MISSING or s[3] is not MISSING) for s in specs)
    import dataclasses

    return tuple((f.name, f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
                 for f in dataclasses.fields(cls))

