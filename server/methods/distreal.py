"""`distreal`, server half (methods.md §2.4): every device gets the full dense model and the
artifacts of every vector on the front; it picks its vector itself and uploads the full dense
model, merged by plain FedAvg (the campaign pairs it with `fedavg-deadline`). Nothing about the
device's resources reaches the server. There is no lighter profile to fall back to after an OOM:
the device's own choice already goes as light as the front allows. A front that does not fit the
model is refused by the build half (models/methods/distreal.py) and by ServerModel, whose
artifact for each vector's profile must be that profile's slice of the global layout."""

from __future__ import annotations

from runtime.protocol import Assignment
from server.methods.base import ServerMethod


class Server(ServerMethod):
    name = "distreal"

    def model_rate(self, assignment: Assignment) -> float:
        return 1.0  # the device trains (and uploads) the whole model over its round

    def smaller(self, profile: str, offered: tuple[str, ...]) -> list[str]:
        return []
