"""`fjord`, server half (methods.md §6.4): a tier-p_max device gets the leading p_max slice of
the global model and one artifact per width of P up to p_max; its update is that slice, merged
per element (each nested slice averages over the clients that trained it, which is HeteroFL's
per-element average with leading indices). The OOM fallback lowers p_max."""

from __future__ import annotations

from runtime.errors import ConfigError
from runtime.methods.fjord import SPEC
from runtime.protocol import Assignment
from server.methods.base import ServerMethod


class Server(ServerMethod):
    name = "fjord"

    def index_profile(self, canonical: str) -> str:
        return self.spec.artifact_profiles(canonical, self.params)[0]

    def model_rate(self, assignment: Assignment) -> float:
        return SPEC.p_max(assignment.profile, self.params)

    def smaller(self, profile: str, offered: tuple[str, ...]) -> list[str]:
        current = SPEC.p_max(profile, self.params)
        found: dict[str, float] = {}
        for text in offered:
            try:
                p = SPEC.p_max(text, self.params)
            except ConfigError:
                continue
            if p < current:
                found[SPEC.parse_profile(text, self.params)] = p
        return sorted(found, key=lambda name: -found[name])
