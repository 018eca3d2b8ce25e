"""FjORD's build half: one artifact per width of P up to each profile's p_max."""

from __future__ import annotations

from models.methods import method_artifacts
from runtime.manifest import read_manifest
from runtime.methods import spec
from runtime.ort import OrtSession
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE


def test_one_artifact_per_width(artifact_cache) -> None:
    params = spec("fjord").params({"widths": [0.25, 0.5, 1.0]})
    sets = method_artifacts("fjord", params, "mlp", INPUT_SHAPE, CLASSES, ["p_max=0.5", "p_max=0.25"],
                            cache_dir=artifact_cache)
    assert set(sets) == {"width=0.5", "width=0.25"}
    sizes = [read_manifest(sets[p].directory).layout.total for p in ("width=0.25", "width=0.5")]
    assert sizes[0] < sizes[1]


def test_distillation_widths_get_the_kd_graph(artifact_cache) -> None:
    params = spec("fjord").params({"widths": [0.25, 0.5, 1.0], "distill": True, "distill_alpha": 0.5})
    sets = method_artifacts("fjord", params, "mlp", INPUT_SHAPE, CLASSES, ["dense"], cache_dir=artifact_cache)
    assert set(sets) == {"dense", "width=0.5@kd-0.5-1", "width=0.25@kd-0.5-1"}
    assert read_manifest(sets["width=0.5@kd-0.5-1"].directory).raw["loss"] == "kd-0.5-1"
    assert OrtSession(sets["width=0.5@kd-0.5-1"].directory)._input_names == ["input", "labels", "teacher"]
    assert OrtSession(sets["dense"].directory)._input_names == ["input", "labels"]  # the teacher trains on CE
    plain = method_artifacts("fjord", spec("fjord").params({"widths": [0.25, 0.5, 1.0]}), "mlp", INPUT_SHAPE,
                             CLASSES, ["dense"], cache_dir=artifact_cache)
    assert plain["width=0.5"].key != sets["width=0.5@kd-0.5-1"].key  # the variant is in the key
