"""Server halves of the methods (see runtime/methods/__init__.py for the unit and registry).

`server_method(name, params, model)` builds the named method's server half; `name=None` (a
campaign without a [method] table) gives `Inferred`, which hands each profile to the first
registered method whose spec accepts it, exactly as the profile strings were read before the
seam existed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runtime.errors import ConfigError
from runtime.methods import METHOD_NAMES, half, infer_method, spec
from runtime.protocol import Assignment
from server.aggregate import IndexArray
from server.methods.base import ServerMethod
from server.policies import ModelOps

__all__ = ["METHOD_NAMES", "Inferred", "ServerMethod", "server_method"]


def server_method(name: str | None, params: Mapping[str, Any] | None, model: ModelOps) -> ServerMethod:
    if name is None:
        return Inferred(model)
    made: ServerMethod = half(name, "server").Server(params or {}, model)
    return made


class Inferred(ServerMethod):
    """Per profile, the first method that accepts it, with that method's default parameters."""

    name = "inferred"

    def __init__(self, model: ModelOps) -> None:
        super().__init__({}, model)
        self._halves: dict[str, ServerMethod] = {}

    def for_profile(self, profile: str) -> ServerMethod:
        name = infer_method(profile)
        if name not in self._halves:
            self._halves[name] = server_method(name, spec(name).params(), self.model)
        return self._halves[name]

    def assign(self, profile: str, round_index: int) -> tuple[Assignment, IndexArray | None]:
        return self.for_profile(profile).assign(profile, round_index)

    def can_assign(self, profile: str) -> bool:
        try:
            return self.for_profile(profile).can_assign(profile)
        except ConfigError:
            return False

    def smaller(self, profile: str, offered: tuple[str, ...]) -> list[str]:
        return self.for_profile(profile).smaller(profile, offered)
