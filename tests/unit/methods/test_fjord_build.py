"""FjORD's build half: one artifact per width of P up to each profile's p_max."""

from __future__ import annotations

from models.methods import method_artifacts
from runtime.manifest import read_manifest
from tests.unit.methods.conftest import CLASSES, INPUT_SHAPE


def test_one_artifact_per_width(artifact_cache) -> None:
    params = {"widths": [0.25, 0.5, 1.0], "resample_every": 1}
    sets = method_artifacts("fjord", params, "mlp", INPUT_SHAPE, CLASSES, ["p_max=0.5", "p_max=0.25"],
                            cache_dir=artifact_cache)
    assert set(sets) == {"width=0.5", "width=0.25"}
    sizes = [read_manifest(sets[p].directory).layout.total for p in ("width=0.25", "width=0.5")]
    assert sizes[0] < sizes[1]
