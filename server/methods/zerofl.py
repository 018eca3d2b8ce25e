"""`zerofl`, server half (methods.md §5.3): every device gets the whole (dense) model; its sparse
upload is merged as sent. Under the strategy's FedAvg merge (`W + Σ n_i Δ̂_i / Σ n_i`, the delta
form of `Σ n_i ŵ_i / Σ n_i`) a coordinate a device did not send moves by a zero delta, which is
ZeroFL's reconstruction: the global value for `top-k-weights` (admission turns sent weights into
a delta against the task's base, the global model of a synchronous round) and a zero delta for
the diff strategies. The downlink stays dense. An update whose form does not match the
campaign's `upload` strategy is refused before it reaches the merge. The served model is scored
with the devices' sparse forward (top-(1 − s) of each masked weight tensor)."""

from __future__ import annotations

from runtime.errors import RoundError
from runtime.layout import ParamLayout
from runtime.methods.zerofl import swat_forward_weights
from server.admission import Payload
from server.aggregate import FloatArray
from server.events import UpdateReceived
from server.methods.base import ServerMethod
from server.policies import Strategy
from server.records import TaskRecord

FORM = {"top-k-weights": "weights", "diff-top-k-weights": "delta", "top-k-diff": "delta"}


class Server(ServerMethod):
    name = "zerofl"

    def admit(self, event: UpdateReceived, task: TaskRecord, base: FloatArray, strategy: Strategy,
              who: str) -> Payload:
        upload = self.spec.params(self.params)["upload"]
        want = FORM.get(upload)
        if want is not None and event.update.kind != want:
            raise RoundError(f"{who}: zerofl upload {upload!r} sends {want}, got kind {event.update.kind!r}")
        return super().admit(event, task, base, strategy, who)

    def served_weights(self, flat: FloatArray, layout: ParamLayout) -> FloatArray:
        return swat_forward_weights(flat, layout, self.spec.params(self.params))
