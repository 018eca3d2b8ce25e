"""Type hints of the wire dataclasses, evaluated on every CPython the runtime runs on (3.8-3.12).

Board modules write `float | None` and `tuple[int, ...]` in annotations, which
`from __future__ import annotations` keeps as strings. Python 3.10+ evaluates them;
3.8 and 3.9 (JetPack 5 boards) cannot, so there each string is rewritten into typing's spelling
(`Union[...]`, `Tuple[...]`, `typing.Mapping[...]`) and evaluated in the class's module.
"""

from __future__ import annotations

import functools
import sys
import typing
from typing import Any


def type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, also on Python 3.8/3.9."""
    if sys.version_info >= (3, 10):
        return typing.get_type_hints(cls)
    return old_type_hints(cls)


def old_type_hints(cls: type) -> dict[str, Any]:
    """Each postponed annotation rewritten into typing's spelling, then evaluated (any version)."""
    import ast  # here, not at the top: on 3.10+ the agent never needs it

    old_typing = _old_typing()
    module = vars(sys.modules[cls.__module__])
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for name, text in vars(klass).get("__annotations__", {}).items():
            tree = ast.fix_missing_locations(old_typing().visit(ast.parse(text, mode="eval")))
            out[name] = eval(compile(tree, f"<{cls.__name__}.{name}>", "eval"), {**module, "typing": typing})
    return out


@functools.lru_cache(maxsize=None)
def _old_typing() -> Any:
    """The transformer class, made with the first 3.8/3.9 hint (ast imported then)."""
    import ast

    class _OldTyping(ast.NodeTransformer):
        """`A | B` -> `Union[A, B]`, `tuple[...]` -> `Tuple[...]`: annotations as 3.8 can evaluate them."""

        _NAMES: typing.ClassVar[dict[str, str]] = {"tuple": "Tuple", "dict": "Dict", "list": "List",
                                                          "Mapping": "Mapping"}

        def visit_BinOp(self, node: Any) -> Any:
            self.generic_visit(node)
            if not isinstance(node.op, ast.BitOr):
                return node
            return ast.Subscript(value=ast.Attribute(value=ast.Name(id="typing", ctx=ast.Load()), attr="Union",
                                                     ctx=ast.Load()),
                                 slice=ast.Index(value=ast.Tuple(elts=[node.left, node.right], ctx=ast.Load())),
                                 ctx=ast.Load())

        def visit_Subscript(self, node: Any) -> Any:
            self.generic_visit(node)
            if isinstance(node.value, ast.Name) and node.value.id in self._NAMES:
                node.value = ast.Attribute(value=ast.Name(id="typing", ctx=ast.Load()),
                                           attr=self._NAMES[node.value.id], ctx=ast.Load())
            return node

    return _OldTyping
