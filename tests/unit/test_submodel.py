"""Slice-then-scatter round trips exactly, for every index-set kind and every model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.builder import build
from models.structure import MODELS, full_structure, sub_structure
from runtime.errors import LayoutError
from runtime.profile import Profile
from runtime.submodel import Submodel, index_map_for, kept_channels

SHAPES = {"mlp": (1, 8, 8), "lenet": (1, 8, 8), "cnn": (3, 16, 16), "resnet": (1, 8, 8)}
LAYOUTS = {m: build(full_structure(m, SHAPES[m], 10)).layout for m in MODELS}


def _reference_extract(layout, flat, index_map):
    """Per-tensor np.ix_ slicing: an independent way to compute the submodel."""
    parts = []
    for name, tensor in layout.split(flat).items():
        spec = layout[name]
        axes = []
        for dim, role in zip(spec.shape, spec.axes, strict=True):
            if role is None or role.group not in index_map:
                axes.append(np.arange(dim))
            else:
                ch = np.asarray(index_map[role.group])
                axes.append((ch[:, None] * role.block + np.arange(role.block)).ravel())
        parts.append(tensor[np.ix_(*axes)].ravel())
    return np.concatenate(parts)


@st.composite
def index_maps(draw, model):
    layout = LAYOUTS[model]
    kind = draw(st.sampled_from(["leading", "rolling", "arbitrary", "classes", "mixed"]))
    if kind in ("leading", "rolling"):
        width = draw(st.floats(0.05, 1.0))
        rnd = draw(st.integers(0, 500))
        return index_map_for(Profile(width=width, window=kind), layout.groups, rnd)
    out = {}
    groups = [g for g in layout.groups if (g == "classes") == (kind == "classes") or kind == "mixed"]
    for g in groups:
        n = layout.groups[g]
        chosen = draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n))
        out[g] = np.array(sorted(chosen), dtype=np.int64)
    return out


@pytest.mark.parametrize("model", MODELS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_slice_scatter_round_trip(model, data):
    layout = LAYOUTS[model]
    imap = data.draw(index_maps(model))
    sub = Submodel.of(layout, imap)
    rng = np.random.default_rng(0)
    g = rng.normal(size=layout.total).astype(np.float32)
    s = sub.extract(g)
    np.testing.assert_array_equal(s, _reference_extract(layout, g, imap))
    # scatter(extract(g)) == g exactly, and extract(scatter(z, s)) == s exactly.
    np.testing.assert_array_equal(sub.scatter(g, s), g)
    new = rng.normal(size=sub.sub_layout.total).astype(np.float32)
    np.testing.assert_array_equal(sub.extract(sub.scatter(g, new)), new)
    # Coordinates outside the submodel are untouched by a scatter.
    outside = np.ones(layout.total, dtype=bool)
    outside[sub.indices] = False
    np.testing.assert_array_equal(sub.scatter(g, new)[outside], g[outside])
    assert len(np.unique(sub.indices)) == len(sub.indices)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("width", [1.0, 0.75, 0.5, 0.25, 0.1])
def test_sub_layout_equals_built_submodel(model, width):
    """The sliced layout is exactly the layout the builder emits for the smaller structure."""
    full = full_structure(model, SHAPES[model], 10)
    imap = index_map_for(Profile(width=width, classes=(1, 4, 7)), LAYOUTS[model].groups)
    sub = Submodel.of(LAYOUTS[model], imap)
    assert build(sub_structure(full, imap)).layout == sub.sub_layout


def test_widths_keep_ceil_channels():
    assert kept_channels(0.5, 7) == 4
    assert kept_channels(0.01, 16) == 1
    assert kept_channels(0.25, 16) == 4
    imap = index_map_for(Profile(width=0.25, window="rolling"), {"a": 8, "classes": 10}, round_index=7)
    assert imap["a"].tolist() == [0, 7]  # (7 + j) mod 8 for j < 2, sorted
    assert "classes" not in imap


@pytest.mark.parametrize(
    "imap, message",
    [
        ({"nope": np.array([0])}, "unknown group"),
        ({"fc1": np.array([], dtype=np.int64)}, "non-empty"),
        ({"fc1": np.array([0, 128])}, "leaves"),
        ({"fc1": np.array([3, 1])}, "strictly increasing"),
        ({"fc1": np.array([0.0, 1.0])}, "dtype"),
    ],
)
def test_bad_index_maps_are_refused(imap, message):
    with pytest.raises(LayoutError, match=message):
        Submodel.of(LAYOUTS["mlp"], imap)


def test_wrong_length_buffers_are_refused():
    sub = Submodel.of(LAYOUTS["mlp"], {"fc1": np.arange(4)})
    with pytest.raises(LayoutError, match=r"global buffer has shape \(3,\)"):
        sub.extract(np.zeros(3, dtype=np.float32))
    with pytest.raises(LayoutError, match="dtype float64"):
        sub.extract(np.zeros(LAYOUTS["mlp"].total))
    with pytest.raises(LayoutError, match="submodel buffer"):
        sub.scatter(np.zeros(LAYOUTS["mlp"].total, dtype=np.float32), np.zeros(5, dtype=np.float32))


def test_group_widths_override_the_width_of_their_groups():
    from runtime.errors import ConfigError
    from runtime.profile import parse_profile

    p = parse_profile("widths=conv2:0.5+conv1:0.75,width=0.25")
    assert p.canonical() == "width=0.25,widths=conv1:0.75+conv2:0.5"
    assert parse_profile(p.canonical()) == p
    full = full_structure("lenet", (1, 8, 8), 10)
    imap = index_map_for(p, full.channels)
    assert {g: len(i) for g, i in imap.items()} == {"conv1": 5, "conv2": 8, "fc1": 30, "fc2": 21}
    layout = build(full).layout
    assert Submodel.of(layout, imap).sub_layout == build(sub_structure(full, imap)).layout
    with pytest.raises(ConfigError, match="profile widths name 'conv9', not a hidden group"):
        index_map_for(parse_profile("widths=conv9:0.5"), full.channels)
    with pytest.raises(ConfigError, match="is not group:width"):
        parse_profile("widths=conv1")
    with pytest.raises(ConfigError, match=r"width 1\.5 of group 'conv1' is outside"):
        parse_profile("widths=conv1:1.5")
