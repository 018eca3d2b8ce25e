"""The board code's Python 3.8 rules, checked on the syntax tree (cheap, any interpreter).

JetPack 5 ships CPython 3.8, so everything under runtime/ must import and run there. Byte-compiling
under 3.8 catches syntax; this catches what 3.8 parses but fails on when the line runs: `X | Y` and
`list[int]` outside annotations (aliases, casts, isinstance, dataclass defaults), and the standard
library calls newer than 3.8. Annotations are safe because every module starts with
`from __future__ import annotations` (checked here too).
"""

from __future__ import annotations

import ast
from pathlib import Path

# Builtins and collections.abc names that became subscriptable only in 3.9 (PEP 585).
_PEP585 = {"list", "dict", "set", "frozenset", "tuple", "type", "Callable", "Mapping", "MutableMapping",
           "Sequence", "MutableSequence", "Iterable", "Iterator", "Generator", "Awaitable", "Coroutine",
           "AbstractSet", "Collection", "Container", "Hashable", "KeysView", "ValuesView", "ItemsView",
           "deque", "defaultdict", "OrderedDict", "Counter", "ChainMap", "Pattern", "Match"}
_NEW_METHODS = {"removeprefix": "3.9", "removesuffix": "3.9", "is_relative_to": "3.9", "with_stem": "3.9",
                "bit_count": "3.10", "randbytes": "3.9", "file_digest": "3.11", "readlink": "3.9"}
_NEW_NAMES = {("functools", "cache"): "3.9", ("itertools", "pairwise"): "3.10", ("math", "lcm"): "3.9",
              ("contextlib", "chdir"): "3.11", ("types", "NoneType"): "3.10", ("datetime", "UTC"): "3.11",
              ("enum", "StrEnum"): "3.11", ("typing", "Self"): "3.11", ("typing", "TypeAlias"): "3.10",
              ("typing", "ParamSpec"): "3.10", ("dataclasses", "KW_ONLY"): "3.10",
              ("os", "waitstatus_to_exitcode"): "3.9", ("types", "UnionType"): "3.10", ("asyncio", "to_thread"): "3.9"}
_NEW_MODULES = {"tomllib": "3.11 (use runtime.tomlconf)", "zoneinfo": "3.9", "graphlib": "3.9"}


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (never evaluated under postponed annotations)."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    roots.append(a.annotation)
            if node.returns is not None:
                roots.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
    return {id(n) for root in roots for n in ast.walk(root)}


def violations(path: Path) -> list[str]:
    """One line `path:line: what` per 3.8 violation in a board module."""
    source = path.read_text()
    tree = ast.parse(source)
    out: list[str] = []

    def bad(node: ast.AST, what: str) -> None:
        out.append(f"{path}:{getattr(node, 'lineno', 0)}: {what}")

    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    if source.strip() and not (body and isinstance(body[0], ast.ImportFrom) and body[0].module == "__future__"
                               and any(a.name == "annotations" for a in body[0].names)):
        bad(tree, "first statement must be `from __future__ import annotations`")
    in_annotation = _annotation_nodes(tree)
    from_typing = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "typing"
                   for a in n.names}
    guarded = _version_guarded(tree)
    for node in ast.walk(tree):
        if type(node).__name__ in ("Match", "TryStar"):
            bad(node, f"`{type(node).__name__.lower()}` statement needs 3.10+")
        if id(node) in in_annotation or id(node) in guarded:
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and _looks_like_type(node):
            bad(node, "`X | Y` type union outside an annotation needs 3.10 (use typing.Union/Optional)")
        elif isinstance(node, ast.Subscript):
            base = node.value
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
            from_typing_module = (isinstance(base, ast.Attribute) and _root_name(base) == "typing") or \
                (isinstance(base, ast.Name) and base.id in from_typing)
            if name in _PEP585 and not from_typing_module:
                bad(node, f"`{name}[...]` outside an annotation needs 3.9 (use typing.{_typing_name(name)})")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "zip" and any(k.arg == "strict" for k in node.keywords):
                bad(node, "zip(strict=) needs 3.10")
            if isinstance(func, ast.Attribute) and func.attr in _NEW_METHODS:
                bad(node, f".{func.attr}() needs {_NEW_METHODS[func.attr]}")
            if _call_name(func) in ("isinstance", "issubclass") and len(node.args) == 2 and \
                    isinstance(node.args[1], ast.BinOp) and isinstance(node.args[1].op, ast.BitOr):
                bad(node, f"{_call_name(func)}(x, A | B) needs 3.10 (use a tuple)")
            if _call_name(func) == "dataclass" and any(k.arg in ("slots", "kw_only") for k in node.keywords):
                bad(node, "dataclass(slots=/kw_only=) needs 3.10")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            since = _NEW_NAMES.get((node.value.id, node.attr))
            if since:
                bad(node, f"{node.value.id}.{node.attr} needs {since}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                since = _NEW_NAMES.get((node.module, a.name))
                if since:
                    bad(node, f"from {node.module} import {a.name} needs {since}")
            if node.module.split(".")[0] in _NEW_MODULES:
                bad(node, f"{node.module} needs {_NEW_MODULES[node.module.split('.')[0]]}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _NEW_MODULES:
                    bad(node, f"import {a.name} needs {_NEW_MODULES[a.name.split('.')[0]]}")
    return sorted(set(out), key=lambda line: int(line.split(":")[1]))


def _version_guarded(tree: ast.AST) -> set[int]:
    """ids of nodes under `if sys.version_info >= (3, N):` (the newer branch) or a getattr fallback."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and \
                ast.unparse(node.test.left) == "sys.version_info" and isinstance(node.test.ops[0], ast.GtE):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def _root_name(node: ast.AST) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def _call_name(func: ast.AST) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _typing_name(name: str) -> str:
    return {"list": "List", "dict": "Dict", "set": "Set", "frozenset": "FrozenSet", "tuple": "Tuple",
            "type": "Type", "deque": "Deque", "defaultdict": "DefaultDict"}.get(name, name)


_BUILTIN_TYPES = {"int", "float", "complex", "str", "bytes", "bytearray", "memoryview", "bool", "list", "dict",
                  "tuple", "set", "frozenset", "type", "object", "range", "slice"}


def _looks_like_type(node: ast.BinOp) -> bool:
    """`int | None`, `Hello | Status`: a union of types, not a bitwise or of numbers or flags (re.I | re.M)."""
    def typeish(n: ast.AST) -> bool:
        if isinstance(n, ast.Constant):
            return n.value is None
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr):
            return typeish(n.left) and typeish(n.right)
        name = n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else None
        if name is not None:
            return name in _BUILTIN_TYPES or (name[:1].isupper() and not name.isupper())  # CamelCase, not FLAG
        return isinstance(n, ast.Subscript) and typeish(n.value)
    return typeish(node)


def board_modules(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runtime").rglob("*.py") if "__pycache__" not in p.parts)
