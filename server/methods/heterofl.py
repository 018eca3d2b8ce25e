"""`heterofl`, server half (methods.md §6.3): leading (HeteroFL) or rolling (FedRolex) channel
windows, merged per element. `average = "count"` counts every covering update once, as the
paper's `W[j] = Σ_{i∋j} W_i[j] / |{i: j∈S_i}|`; `"samples"` (the default, and what the
engine did before the seam) weighs each by its sample count as the strategy's weight says."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.methods.base import ServerMethod
from server.policies import WeightInput, WeightPolicy


@dataclass(frozen=True)
class CountWeight(WeightPolicy):
    """Every update weighs 1: the per-element merge then divides by the number of holders."""

    def weights(self, items: Sequence[WeightInput]) -> list[float]:
        return [1.0] * len(items)


class Server(ServerMethod):
    name = "heterofl"

    def weight_policy(self, strategy_weight: WeightPolicy) -> WeightPolicy:
        return CountWeight() if self.params.get("average") == "count" else strategy_weight
