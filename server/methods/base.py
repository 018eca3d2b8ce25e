"""What a method's server half does, and the default every slicing method shares.

    assign(profile, round) -> (Assignment, global indices or None); cached by the engine per (profile, round)
    admit(event, task, base, strategy, who) -> Payload       (server/admission.py by default)
    weight_policy(strategy's) -> the WeightPolicy the merge uses
    smaller(profile, offered) -> a lighter profile after an OOM, or None
    served_weights(global, layout) -> the weights the served model is scored with
    on_hello(device, hello), on_global(version, global) -> what a method that keeps state learns
    indices_derivable: indices are a pure function of (profile, round), so a checkpoint
                       recomputes them; a method whose indices are not stores them.

The round policy (close, weight, merge) stays the strategy's; a method only supplies defaults
for it (`MethodSpec.strategy_defaults`) and may replace the weight policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from runtime.errors import ConfigError
from runtime.layout import ParamLayout
from runtime.methods import spec
from runtime.methods.base import MethodSpec
from runtime.profile import parse_profile
from runtime.protocol import Assignment, Hello
from server.admission import Payload, admit_payload
from server.aggregate import FloatArray, IndexArray
from server.events import UpdateReceived
from server.policies import ModelOps, Strategy, WeightPolicy
from server.records import TaskRecord


class ServerMethod:
    name: ClassVar[str]
    indices_derivable: ClassVar[bool] = True
    # A profile's artifact slice (runtime/submodel.py) is what its devices train, so the server
    # scores that slice each version; False where the method picks other coordinates (Chen & Qin).
    profile_slices_fixed: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, Any], model: ModelOps) -> None:
        self.model = model
        self.params = dict(params)

    def for_profile(self, profile: str) -> ServerMethod:
        """The half that handles `profile` (itself, except for `Inferred`)."""
        return self

    @property
    def spec(self) -> MethodSpec:
        return spec(self.name)

    def canonical(self, profile: str) -> str:
        return self.spec.parse_profile(profile, self.params)

    def index_profile(self, canonical: str) -> str:
        """The runtime.profile string whose coordinates a task under `canonical` covers."""
        return canonical

    def assign(self, profile: str, round_index: int) -> tuple[Assignment, IndexArray | None]:
        s, params = self.spec, self.params
        canonical = s.parse_profile(profile, params)
        keys = tuple(self.model.artifact_key(p) for p in s.artifact_profiles(canonical, params))
        indices = self.model.indices_for(self.index_profile(canonical), round_index)
        return Assignment(s.name, canonical, keys, s.extras(canonical, params)), indices

    def model_rate(self, assignment: Assignment) -> float:
        """The client's model rate (Co-S²P's rate_i, methods.md §1.3): its width, not the share
        of coordinates it covers (a width-0.5 conv layer holds a quarter of the weights)."""
        return parse_profile(assignment.profile).width

    def can_assign(self, profile: str) -> bool:
        """Whether every artifact `profile` needs exists (the OOM fallback must not pick one that doesn't)."""
        try:
            canonical = self.canonical(profile)
            for p in self.spec.artifact_profiles(canonical, self.params):
                self.model.artifact_key(p)
        except ConfigError:
            return False
        return True

    def admit(self, event: UpdateReceived, task: TaskRecord, base: FloatArray, strategy: Strategy,
              who: str) -> Payload:
        return admit_payload(event, task, base, strategy, who, self.model_rate(task.assignment))

    def served_weights(self, flat: FloatArray, layout: ParamLayout) -> FloatArray:
        """The weights the global model is scored (served) with: as they are, unless the method's
        devices run a different forward (ZeroFL's top-k sparse one)."""
        return flat

    def weight_policy(self, strategy_weight: WeightPolicy) -> WeightPolicy:
        return strategy_weight

    def on_hello(self, device_id: str, hello: Hello) -> None:
        """A device said hello (its label histogram, what it can run); most methods ignore it."""
        return None

    def on_global(self, version: int, flat: FloatArray) -> None:
        """The global model is now `version` (0: the initial one, also after a resume); called
        before any task of that version is assigned. Chen & Qin rescore relevance here."""
        return None

    def smaller(self, profile: str, offered: tuple[str, ...]) -> list[str]:
        """The profiles in `offered` that train strictly fewer channels than `profile`, largest first.

        Only the width may shrink: a different window or class subset is another task, not a
        lighter version of the same one."""
        current = parse_profile(profile)
        found: dict[str, float] = {}
        for text in offered:
            try:
                p = parse_profile(text)
            except ConfigError:
                continue  # a device's list is input; a bad entry is just not a candidate
            if p.width < current.width and p.window == current.window and p.classes == current.classes:
                found[p.canonical()] = p.width
        return sorted(found, key=lambda name: -found[name])
