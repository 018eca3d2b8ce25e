"""classes' server half: a task covers its classifier rows; the OOM fallback keeps the classes."""

from __future__ import annotations

from models.builder import build
from models.structure import full_structure
from server.methods import server_method
from tests.unit.methods.server_rig import LayoutModel

LAYOUT = build(full_structure("mlp", (1, 4, 4), 5)).layout


def test_assign_covers_the_class_rows() -> None:
    method = server_method("classes", {}, LayoutModel(LAYOUT))
    assignment, indices = method.assign("classes=1+3", 0)
    assert assignment.method == "classes" and assignment.profile == "classes=1+3"
    out_b = LAYOUT["out.b"]
    assert indices is not None
    assert set(indices[(indices >= out_b.offset) & (indices < out_b.end)] - out_b.offset) == {1, 3}
    assert method.model_rate(assignment) == 1.0


def test_fallback_keeps_the_classes() -> None:
    method = server_method("classes", {}, LayoutModel(LAYOUT))
    offered = ("classes=1+3,width=0.5", "width=0.5", "classes=1+3")
    assert method.smaller("classes=1+3", offered) == ["width=0.5,classes=1+3"]
    assert all(method.can_assign(p) for p in offered) and not method.can_assign("p_max=0.5")
