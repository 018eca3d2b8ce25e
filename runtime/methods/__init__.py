"""Methods as units: one name, three same-named halves, found by lazy import.

    runtime/methods/<name>.py   device half (`Device`) + the method's spec (`SPEC`)   board code
    server/methods/<name>.py    server half (`Server`): assign, admit, weights, OOM fallback
    models/methods/<name>.py    build half (`build`): the artifacts the method needs    host only

Only the names live here; a half is imported when it is asked for, so a board never imports
`server` or `onnx`. Adding a method: write the three files, add the name below, add one test
file per half (tests/unit/methods/test_<name>_{device,server,build}.py); a meta-test checks.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING

from runtime.errors import ConfigError

if TYPE_CHECKING:
    from runtime.methods.base import BackendOpener, DeviceMethod, MethodSpec
    from runtime.protocol import Assignment

# Order matters only for inference: a campaign without a [method] table gets, per profile, the
# first method whose spec accepts it (dense -> fedavg, width -> heterofl, classes -> classes).
METHOD_NAMES: tuple[str, ...] = ("fedavg", "heterofl", "classes", "fjord", "zerofl", "distreal", "mpsl")
HALF_PACKAGES = {"device": "runtime.methods", "server": "server.methods", "build": "models.methods"}


def check_name(name: str) -> str:
    if name not in METHOD_NAMES:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return name


def half(name: str, role: str) -> ModuleType:
    """The module of `name`'s `role` half (device | server | build)."""
    return importlib.import_module(f"{HALF_PACKAGES[role]}.{check_name(name)}")


def spec(name: str) -> MethodSpec:
    found: MethodSpec = half(name, "device").SPEC
    return found


def device_method(assignment: Assignment, open_backend: BackendOpener) -> DeviceMethod:
    """The device half for one task, built from its assignment."""
    made: DeviceMethod = half(assignment.method, "device").Device(assignment, open_backend)
    return made


def infer_method(profile: str) -> str:
    """The first registered method whose spec accepts `profile` (legacy campaigns)."""
    why: dict[str, list[str]] = {}  # each method's reason, so the error says what is wrong
    for name in METHOD_NAMES:
        try:
            spec(name).parse_profile(profile, None)
        except ConfigError as exc:
            why.setdefault(str(exc), []).append(name)
            continue
        return name
    reasons = "; ".join(f"{reason} ({', '.join(names)})" for reason, names in why.items())
    raise ConfigError(f"no method takes profile {profile!r}: {reasons}")


def device_profile(text: str) -> str:
    """`text` canonical in the grammar of the first method that takes it, checked by grammar only
    (what a device or a bundle can know: the campaign's [method] keys are the server's)."""
    return spec(infer_method(text)).parse_profile(text, None)


def infer_common(profiles: Iterable[str]) -> str:
    """The first method that accepts every profile in `profiles`."""
    texts = list(profiles)
    for name in METHOD_NAMES:
        s = spec(name)
        if all(s.accepts(p) for p in texts):
            return name
    raise ConfigError(f"no single method accepts all of the profiles {texts}")
