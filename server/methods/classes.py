"""`classes`, server half: the task's coordinates are its profile's slice (runtime/submodel.py);
admission and the OOM fallback are the shared ones (server/methods/base.py)."""

from __future__ import annotations

from server.methods.base import ServerMethod


class Server(ServerMethod):
    name = "classes"
