"""Profiles: what a device trains.

Grammar: `dense`, or comma-separated `key=value` items, e.g. `width=0.5`,
`width=0.25,window=rolling`, `classes=0-4`, `classes=0+3+7,width=0.5`,
`drop=conv1:0.25+conv3:0.5`.
`width=0.25,widths=conv1:0.5+conv2:0.5` (a group's own width overrides `width` for it).
Class lists use `+` between items and `a-b` for inclusive ranges (commas separate items).
`drop` gives a per-group share of channels dropped (a DISTREAL dropout vector, methods.md §2):
the structure keeps `ceil((1 - d) * C)` channels of each named group; which ones is the device's
draw, per mini-batch. Rates lie in [0, 1); a rate of 0 is left out of the canonical form.
"""

from __future__ import annotations

from runtime.errors import ConfigError
from runtime.record import record

WINDOWS = ("leading", "rolling")


@record
class Profile:
    width: float = 1.0  # fraction of channels kept in every hidden group, in (0, 1]
    window: str = "leading"  # leading (HeteroFL, FjORD) | rolling (FedRolex)
    classes: tuple[int, ...] | None = None  # class subset (Chen & Qin); None = all classes
    drop: tuple[tuple[str, float], ...] = ()  # (group, dropped share in [0, 1)), sorted by group
    # Fraction of a multi-exit model's block groups kept (Co-S²P's depth rate ρ_d), in (0, 1]; it
    # selects tensors, not channels (an artifact's structure says which, models/artifacts.py).
    depth: float = 1.0
    # (group, width) pairs sorted by group: those groups keep their own share instead of `width`
    # (Chen & Qin's minimum keep ratio of the first layers)
    group_widths: tuple[tuple[str, float], ...] = ()

    def width_of(self, group: str) -> float:
        return dict(self.group_widths).get(group, self.width)

    def __post_init__(self) -> None:
        if not 0.0 < self.width <= 1.0:
            raise ConfigError(f"profile width {self.width} is outside (0, 1]")
        if not 0.0 < self.depth <= 1.0:
            raise ConfigError(f"profile depth {self.depth} is outside (0, 1]")
        if self.window not in WINDOWS:
            raise ConfigError(f"profile window {self.window!r} is not one of {', '.join(WINDOWS)}")
        if self.classes is not None:
            if not self.classes:
                raise ConfigError("profile class subset is empty")
            if min(self.classes) < 0:
                raise ConfigError(f"profile class subset {list(self.classes)} has a negative class")
            if len(set(self.classes)) != len(self.classes) or list(self.classes) != sorted(self.classes):
                raise ConfigError(f"profile class subset {list(self.classes)} must be sorted and unique")
        for group, rate in self.drop:
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"profile dropout rate {group}:{rate:g} is outside [0, 1)")
        if self.drop and self.width != 1.0:
            raise ConfigError("profile keys drop and width do not combine: a dropout vector sets every width")
        names = [g for g, _ in self.group_widths]
        if names != sorted(set(names)):
            raise ConfigError(f"profile widths {names} must name each group once, sorted")
        for group, w in self.group_widths:
            if not 0.0 < w <= 1.0:
                raise ConfigError(f"profile width {w} of group {group!r} is outside (0, 1]")

    def canonical(self) -> str:
        items = []
        if self.width != 1.0:
            items.append(f"width={self.width:g}")
        if self.window != "leading":
            items.append(f"window={self.window}")
        if self.classes is not None:
            items.append("classes=" + "+".join(str(c) for c in self.classes))
        kept = [f"{g}:{r:g}" for g, r in self.drop if r > 0]
        if kept:
            items.append("drop=" + "+".join(kept))
        if self.depth != 1.0:
            items.append(f"depth={self.depth:g}")
        if self.group_widths:
            items.append("widths=" + "+".join(f"{g}:{w:g}" for g, w in self.group_widths))
        return ",".join(items) or "dense"


MAX_CLASS_INDEX = 9_999  # profiles arrive in hellos: "classes=0-20000000" once took a server to 1.6 GB


def _parse_classes(text: str) -> tuple[int, ...]:
    out: set[int] = set()
    for part in text.split("+"):
        part = part.strip()
        if not part:
            continue
        try:
            lo, _, hi_text = part.partition("-")
            lo_i = int(lo)
            hi = int(hi_text) if hi_text else lo_i
        except ValueError:
            raise ConfigError(f"profile class list {_short(text)}: {_short(part)} is not a class index or a-b range"
                              ) from None
        if hi < lo_i:
            raise ConfigError(f"profile class range {_short(part)} is empty")
        if lo_i < 0 or hi > MAX_CLASS_INDEX:
            raise ConfigError(f"profile class range {_short(part)} is outside 0-{MAX_CLASS_INDEX}")
        out.update(range(lo_i, hi + 1))
    return tuple(sorted(out))


def _short(text: str, limit: int = 60) -> str:
    """repr of `text`, cut: a profile comes from a device and may be any length."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _parse_drop(text: str) -> tuple[tuple[str, float], ...]:
    rates: dict[str, float] = {}
    for part in text.split("+"):
        group, sep, value = part.strip().partition(":")
        if not sep or not group.strip():
            raise ConfigError(f"profile drop item {_short(part.strip())} in {_short(text)} is not group:rate")
        try:
            rate = float(value)
        except ValueError:
            raise ConfigError(f"profile dropout rate {_short(part.strip())} is not a number") from None
        if not 0.0 <= rate < 1.0:  # NaN fails it too
            raise ConfigError(f"profile dropout rate {_short(part.strip())} is outside [0, 1)")
        rates[group.strip()] = rate
    return tuple(sorted(rates.items()))


def _parse_group_widths(text: str) -> tuple[tuple[str, float], ...]:
    out: dict[str, float] = {}
    for part in text.split("+"):
        group, sep, value = part.partition(":")
        group = group.strip()
        try:
            if not sep or not group:
                raise ValueError
            out[group] = float(value)
        except ValueError:
            raise ConfigError(f"profile widths {_short(text)}: {_short(part)} is not group:width") from None
    return tuple(sorted(out.items()))


def parse_profile(text: str) -> Profile:
    text = text.strip()
    if text in ("", "dense"):
        return Profile()
    width, window, depth = 1.0, "leading", 1.0
    classes: tuple[int, ...] | None = None
    drop: tuple[tuple[str, float], ...] = ()
    group_widths: tuple[tuple[str, float], ...] = ()
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigError(f"profile item {item!r} in {text!r} is not key=value")
        if key == "width":
            try:
                width = float(value)
            except ValueError:
                raise ConfigError(f"profile width {value!r} is not a number") from None
        elif key == "window":
            window = value
        elif key == "classes":
            classes = _parse_classes(value)
        elif key == "drop":
            drop = _parse_drop(value)
        elif key == "depth":
            try:
                depth = float(value)
            except ValueError:
                raise ConfigError(f"profile depth {value!r} is not a number") from None
        elif key == "widths":
            group_widths = _parse_group_widths(value)
        else:
            raise ConfigError(f"unknown profile key {key!r} in {text!r}; "
                              "known: width, window, classes, drop, depth, widths")
    return Profile(width=width, window=window, classes=classes, drop=drop, depth=depth, group_widths=group_widths)


def split_variant(text: str) -> tuple[str, str | None]:
    """`width=0.5@kd-0.5-2` -> ("width=0.5", "kd-0.5-2"): an artifact's structural profile and the
    graph variant it is generated in (models/losses.py); no `@`: the default variant (None)."""
    profile, sep, variant = text.partition("@")
    if sep and not variant:
        raise ConfigError(f"artifact profile {text!r} has an empty variant after '@'")
    return profile, (variant if sep else None)


def with_variant(profile: str, variant: str | None) -> str:
    return profile if variant is None else f"{profile}@{variant}"
